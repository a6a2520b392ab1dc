"""Random-weight Qwen2.5-VL models of the REAL sizes, for speed and memory checks without weights.

    python -m medloc.models.shapes --shape qwen2.5-vl-3b --out /tmp/qwen3b-random

Architecture numbers are those of the released Qwen2.5-VL configs (3B / 7B / 32B); the tokenizer,
chat template and processor are the embedded tiny ones (medloc.models.tiny), and the embedding
keeps the real vocabulary size (151,936 rows for 3B, 152,064 for 7B and 32B) so memory and time
match the real model. ``medloc.engine_plan`` reads this table for its memory plans of the real sizes. The
result is an ordinary Hugging Face folder that ``from_pretrained`` loads: the trainer runs on it
exactly as on the real checkpoint, only the answers are noise.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from medloc.atomic import atomic_directory
from medloc.logging import console
from medloc.models import tiny


@dataclass(frozen=True)
class Shape:
    hidden: int
    mlp: int
    layers: int
    heads: int
    kv_heads: int
    mrope_section: tuple[int, int, int]
    tie_embeddings: bool
    vision_depth: int = 32
    vision_hidden: int = 1280
    vision_mlp: int = 3420
    vision_heads: int = 16
    vocab: int = 151936


SHAPES = {
    "qwen2.5-vl-3b": Shape(hidden=2048, mlp=11008, layers=36, heads=16, kv_heads=2,
                           mrope_section=(16, 24, 24), tie_embeddings=True),
    "qwen2.5-vl-7b": Shape(hidden=3584, mlp=18944, layers=28, heads=28, kv_heads=4,
                           mrope_section=(16, 24, 24), tie_embeddings=False, vocab=152064),
    "qwen2.5-vl-32b": Shape(hidden=5120, mlp=27648, layers=64, heads=40, kv_heads=8,
                            mrope_section=(16, 24, 24), tie_embeddings=False, vision_mlp=3456,
                            vocab=152064),
}


def shape_config(shape: Shape, tokenizer) -> Qwen2_5_VLConfig:
    """A full-size config whose special-token ids come from the (tiny) tokenizer."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in tiny.QWEN25VL_SPECIAL_TOKENS}
    return Qwen2_5_VLConfig(
        text_config={
            "vocab_size": shape.vocab,
            "hidden_size": shape.hidden,
            "intermediate_size": shape.mlp,
            "num_hidden_layers": shape.layers,
            "num_attention_heads": shape.heads,
            "num_key_value_heads": shape.kv_heads,
            "hidden_act": "silu",
            "max_position_embeddings": 128000,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0,
                                "mrope_section": list(shape.mrope_section)},
            "bos_token_id": ids[tiny.ENDOFTEXT],
            "eos_token_id": ids[tiny.IM_END],
            "pad_token_id": ids[tiny.ENDOFTEXT],
            "use_sliding_window": False,
        },
        vision_config={
            "depth": shape.vision_depth, "hidden_size": shape.vision_hidden,
            "intermediate_size": shape.vision_mlp, "num_heads": shape.vision_heads,
            "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
            "window_size": 112, "out_hidden_size": shape.hidden,
            "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
        },
        image_token_id=ids[tiny.IMAGE_PAD],
        video_token_id=ids[tiny.VIDEO_PAD],
        vision_start_token_id=ids[tiny.VISION_START],
        vision_end_token_id=ids[tiny.VISION_END],
        tie_word_embeddings=shape.tie_embeddings,
    )


def build_random_shape(out_dir: str | Path, *, shape: str = "qwen2.5-vl-3b", seed: int = 0,
                       min_pixels: int = 3136, max_pixels: int = 1003520,
                       dtype: torch.dtype = torch.bfloat16) -> Path:
    if shape not in SHAPES:
        raise ValueError(f"shape={shape!r}; expected one of {sorted(SHAPES)}")
    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    tokenizer = tiny.train_tiny_tokenizer(tiny.tiny_arch("tiny-1m").bpe_vocab_size)
    config = shape_config(SHAPES[shape], tokenizer)
    torch.manual_seed(seed)
    # Random init of billions of weights is minutes on CPU and seconds on a GPU.
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
    end = tokenizer.convert_tokens_to_ids(tiny.ENDOFTEXT)
    model.generation_config = GenerationConfig(
        bos_token_id=end, eos_token_id=[tokenizer.convert_tokens_to_ids(tiny.IM_END), end],
        pad_token_id=end)
    vc = config.vision_config
    processor = tiny.tiny_processor(tokenizer, patch_size=vc.patch_size,
                                    merge_size=vc.spatial_merge_size,
                                    temporal_patch_size=vc.temporal_patch_size,
                                    min_pixels=min_pixels, max_pixels=max_pixels)
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    n = sum(p.numel() for p in model.parameters())
    console(f"built random {shape}: {n / 1e9:.2f}B parameters in {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="qwen2.5-vl-3b", choices=sorted(SHAPES))
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    build_random_shape(args.out, shape=args.shape, seed=args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
