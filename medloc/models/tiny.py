"""The embedded default model: a tiny Qwen2.5-VL built offline with the real transformers classes.

`build_tiny_model` writes an ordinary Hugging Face folder (config, safetensors weights, generation
config, tokenizer, image/video processor, chat template) that the rest of medloc loads exactly as it
loads ``Qwen/Qwen2.5-VL-3B-Instruct`` from a local path (`medloc.models.loading`). Nothing
downstream knows the model is tiny.

What is real and what is not:
- Architecture: `Qwen2_5_VLForConditionalGeneration` (vision tower with windowed attention and
  2x2 patch merger, M-RoPE text decoder), only narrower and shallower; random weights, fp32.
- Processor: `Qwen2_5_VLProcessor` with `Qwen2VLImageProcessor` / `Qwen2VLVideoProcessor`
  (patch 14, merge 2, so a 112x112 image becomes 8x8 patches -> 4x4 = 16 image tokens).
- Tokenizer (`medloc.models.tiny_tokenizer`): byte-level BPE trained with the `tokenizers` library
  on a small built-in corpus (prompt and answer templates, chat scaffold, JSON, numbers), with
  Qwen2's pre-tokenizer, in which every digit is its own pre-token (so no merge ever spans two
  digits: "123" is three tokens). It is saved as a `Qwen2Tokenizer` with Qwen2.5-VL's special
  tokens and chat template; every special-token id in the model config is read from it.

Sizes (`TinySize`): ``"tiny-1m"`` (~1M parameters, for tests and quick runs) and ``"tiny-4m"``
(a few million, for the demo). Building is deterministic for a seed: the same files, byte for
byte (the tokenizer does not depend on the seed at all; the weights do).

CLI: ``python -m medloc.models.tiny --size tiny-1m --out cache/models/tiny-1m [--seed 0]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
from transformers import (
    GenerationConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from medloc.atomic import atomic_directory
from medloc.logging import console
from medloc.models.tiny_tokenizer import (  # re-exported: the tokenizer is part of the tiny build
    ENDOFTEXT,
    IM_END,
    IMAGE_PAD,
    QWEN25VL_CHAT_TEMPLATE,
    QWEN25VL_SPECIAL_TOKENS,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    train_tiny_tokenizer,
)

TinySize = Literal["tiny-1m", "tiny-4m"]

# Default pixel budget of the tiny processor: a 112x112 image stays 112x112 (8x8 patches of 14,
# 4x4 = 16 tokens after the 2x2 merge); larger images are shrunk to at most 112*112 pixels.
TINY_MIN_PIXELS = 56 * 56
TINY_MAX_PIXELS = 112 * 112

BUILD_MANIFEST = "medloc_tiny.json"


@dataclass(frozen=True)
class TinyArch:
    """Widths and depths of one tiny size. head_dim = text_hidden / text_heads."""

    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_mlp: int
    # (temporal, height, width) rotary frequency pairs of M-RoPE; must sum to head_dim/2
    mrope_section: tuple[int, int, int]
    vision_hidden: int
    vision_depth: int
    vision_heads: int
    vision_mlp: int
    # Upper bound on the trained BPE vocabulary (before special tokens). The built-in corpus runs
    # out of pairs seen twice before 768, so the real size is set by the corpus (514 + 14 special).
    bpe_vocab_size: int


TINY_ARCHS: dict[str, TinyArch] = {
    # head_dim 128/4 = 32 -> 16 rotary pairs split (4, 6, 6), the real (16, 24, 24) scaled by 1/4.
    "tiny-1m": TinyArch(
        text_hidden=128, text_layers=4, text_heads=4, text_kv_heads=2, text_mlp=256,
        mrope_section=(4, 6, 6),
        vision_hidden=64, vision_depth=2, vision_heads=2, vision_mlp=128,
        bpe_vocab_size=768,
    ),
    # head_dim 256/8 = 32 -> the same (4, 6, 6).
    "tiny-4m": TinyArch(
        text_hidden=256, text_layers=4, text_heads=8, text_kv_heads=4, text_mlp=768,
        mrope_section=(4, 6, 6),
        vision_hidden=128, vision_depth=4, vision_heads=4, vision_mlp=256,
        bpe_vocab_size=768,
    ),
}  # fmt: skip


def tiny_arch(size: str) -> TinyArch:
    """The architecture of `size`; raises ValueError naming the allowed sizes."""
    allowed = get_args(TinySize)
    if size not in allowed:
        raise ValueError(f"size={size!r} is not one of {list(allowed)}")
    return TINY_ARCHS[size]



def tiny_config(arch: TinyArch, tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLConfig:
    """A `Qwen2_5_VLConfig` for `arch` whose every special-token id comes from `tokenizer`."""
    head_dim = arch.text_hidden // arch.text_heads
    if arch.text_hidden % arch.text_heads or sum(arch.mrope_section) * 2 != head_dim:
        raise ValueError(
            f"mrope_section {arch.mrope_section} must sum to head_dim/2 = {head_dim // 2} "
            f"(text_hidden {arch.text_hidden} / text_heads {arch.text_heads} / 2)"
        )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN25VL_SPECIAL_TOKENS}
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": arch.text_hidden,
        "intermediate_size": arch.text_mlp,
        "num_hidden_layers": arch.text_layers,
        "num_attention_heads": arch.text_heads,
        "num_key_value_heads": arch.text_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1_000_000.0,
            "mrope_section": list(arch.mrope_section),
        },
        "bos_token_id": ids[ENDOFTEXT],
        "eos_token_id": ids[IM_END],
        "pad_token_id": ids[ENDOFTEXT],
        "use_sliding_window": False,
    }
    vision_config = {
        "depth": arch.vision_depth,
        "hidden_size": arch.vision_hidden,
        "intermediate_size": arch.vision_mlp,
        "num_heads": arch.vision_heads,
        "in_channels": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,  # one 112x112-pixel attention window = the whole default image
        "out_hidden_size": arch.text_hidden,
        "fullatt_block_indexes": [arch.vision_depth - 1],  # the last block attends globally
        "tokens_per_second": 2,
    }
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
        tie_word_embeddings=True,  # as Qwen2.5-VL-3B
        dtype="float32",
    )


def tiny_processor(
    tokenizer: Qwen2Tokenizer,
    *,
    patch_size: int,
    merge_size: int,
    temporal_patch_size: int,
    min_pixels: int,
    max_pixels: int,
) -> Qwen2_5_VLProcessor:
    """The real `Qwen2_5_VLProcessor` around `tokenizer` with the given pixel budget."""
    common = {
        "patch_size": patch_size,
        "merge_size": merge_size,
        "temporal_patch_size": temporal_patch_size,
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
    }
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**common),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**common),
        chat_template=QWEN25VL_CHAT_TEMPLATE,
    )


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Parameter counts (unique tensors, so tied embeddings count once): total/vision/text."""
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for p in model.model.visual.parameters())
    return {"total": total, "vision": vision, "text": total - vision}


@dataclass(frozen=True)
class TinyBuildInfo:
    """What `build_tiny_model` wrote into `medloc_tiny.json` beside the HF files."""

    size: str
    seed: int
    min_pixels: int
    max_pixels: int
    vocab_size: int
    params_total: int
    params_vision: int
    params_text: int


def create_tiny_model(
    *,
    size: TinySize = "tiny-1m",
    seed: int = 0,
    min_pixels: int = TINY_MIN_PIXELS,
    max_pixels: int = TINY_MAX_PIXELS,
) -> tuple[Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, TinyBuildInfo]:
    """The tiny model (random fp32 weights from `seed`, eval mode) and its processor, in memory.

    The global torch RNG state is left as it was.
    """
    arch = tiny_arch(size)
    if not (0 < min_pixels <= max_pixels):
        raise ValueError(f"need 0 < min_pixels <= max_pixels, got {min_pixels}, {max_pixels}")
    tokenizer = train_tiny_tokenizer(arch.bpe_vocab_size)
    config = tiny_config(arch, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()
    end_of_text = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    model.generation_config = GenerationConfig(
        bos_token_id=end_of_text,
        eos_token_id=[tokenizer.convert_tokens_to_ids(IM_END), end_of_text],
        pad_token_id=end_of_text,
    )
    vc = config.vision_config
    processor = tiny_processor(
        tokenizer,
        patch_size=vc.patch_size,
        merge_size=vc.spatial_merge_size,
        temporal_patch_size=vc.temporal_patch_size,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
    )
    counts = count_parameters(model)
    info = TinyBuildInfo(
        size=size,
        seed=seed,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        vocab_size=len(tokenizer),
        params_total=counts["total"],
        params_vision=counts["vision"],
        params_text=counts["text"],
    )
    return model, processor, info


def build_tiny_model(
    out_dir: str | os.PathLike[str],
    *,
    size: TinySize = "tiny-1m",
    seed: int = 0,
    min_pixels: int = TINY_MIN_PIXELS,
    max_pixels: int = TINY_MAX_PIXELS,
    overwrite: bool = False,
) -> Path:
    """Build the tiny Qwen2.5-VL and save it as a Hugging Face folder at `out_dir`.

    The folder is written to a temporary sibling directory and renamed into place, so a crash never
    leaves a half-written model. If `out_dir` already holds a build with the same size, seed and
    pixel budget it is returned untouched; a different build there raises unless `overwrite`.
    Returns the folder path.
    """
    tiny_arch(size)  # validate before touching the disk
    out = Path(out_dir)
    wanted = {"size": size, "seed": seed, "min_pixels": min_pixels, "max_pixels": max_pixels}
    if out.exists():
        manifest = out / BUILD_MANIFEST
        existing = json.loads(manifest.read_text()) if manifest.is_file() else None
        same = existing is not None and all(existing.get(k) == v for k, v in wanted.items())
        if same and not overwrite:
            return out
        if not overwrite:
            raise FileExistsError(
                f"{out} exists and is not a tiny build with {wanted} "
                f"(found {existing}); pass overwrite=True / --overwrite to replace it"
            )
    model, processor, info = create_tiny_model(
        size=size, seed=seed, min_pixels=min_pixels, max_pixels=max_pixels
    )

    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / BUILD_MANIFEST).write_text(json.dumps(asdict(info), indent=2, sort_keys=True) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m medloc.models.tiny",
        description="Build the tiny offline Qwen2.5-VL (random weights) as a Hugging Face folder.",
    )
    parser.add_argument("--size", default="tiny-1m", choices=list(get_args(TinySize)))
    parser.add_argument("--out", required=True, help="output folder, e.g. cache/models/tiny-1m")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-pixels", type=int, default=TINY_MIN_PIXELS)
    parser.add_argument("--max-pixels", type=int, default=TINY_MAX_PIXELS)
    parser.add_argument("--overwrite", action="store_true", help="replace a different build")
    args = parser.parse_args(argv)
    if "qwen" in Path(args.out).name.lower():
        # A random model in a folder named for a released checkpoint would later pass for it.
        console(f"error: --out {args.out}: a folder named like a released Qwen checkpoint; the tiny "
                f"model has random weights. Build it at its cache location, e.g. "
                f"cache/models/{args.size}", err=True)
        return 2
    t0 = time.perf_counter()
    try:
        path = build_tiny_model(
            args.out,
            size=args.size,
            seed=args.seed,
            min_pixels=args.min_pixels,
            max_pixels=args.max_pixels,
            overwrite=args.overwrite,
        )
    except (FileExistsError, ValueError) as err:
        console(f"error: {err}", err=True)
        return 2
    info = json.loads((path / BUILD_MANIFEST).read_text())
    console(
        f"tiny model {info['size']} (seed {info['seed']}) at {path}: "
        f"{info['params_total']:,} parameters (vision {info['params_vision']:,}, "
        f"text {info['params_text']:,}), vocab {info['vocab_size']}, "
        f"{time.perf_counter() - t0:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
