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
- Tokenizer: byte-level BPE trained here with the `tokenizers` library on a small built-in corpus
  (prompt and answer templates, chat scaffold, JSON, numbers), with Qwen2's pre-tokenizer, in which
  every digit is its own pre-token (so no merge ever spans two digits: "123" is three tokens).
  It is saved as a `Qwen2Tokenizer` with Qwen2.5-VL's special tokens and chat template; every
  special-token id in the model config is read from it.

Sizes (`TinySize`): ``"tiny-1m"`` (~1M parameters, for tests and quick runs) and ``"tiny-4m"``
(a few million, for the demo). Building is deterministic for a seed: the same files, byte for
byte (the tokenizer does not depend on the seed at all; the weights do).

CLI: ``python -m medloc.models.tiny --size tiny-1m --out cache/models/tiny-1m [--seed 0]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from medloc.data.prompts import (
    BARE_LIST_SUFFIX,
    REC_QUESTION_TEMPLATE,
    THINK_ANSWER_SUFFIX,
    format_answer,
)

TinySize = Literal["tiny-1m", "tiny-4m"]

# Qwen2's pre-tokenizer split (a property of the Qwen2 tokenizer format, also what
# `transformers.Qwen2Tokenizer` rebuilds on load): `\p{N}` matches ONE digit, so digits are never
# merged with anything.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2.5-VL's special tokens, in the order of their ids in the real tokenizer (151643...151656).
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
VISION_PAD = "<|vision_pad|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
QWEN25VL_SPECIAL_TOKENS = (
    ENDOFTEXT,
    IM_START,
    IM_END,
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    VISION_START,
    VISION_END,
    VISION_PAD,
    IMAGE_PAD,
    VIDEO_PAD,
)

# The Qwen2.5-VL chat template (same text structure as the one shipped with
# Qwen/Qwen2.5-VL-3B-Instruct): a default system turn, then each message as
# <|im_start|>role\n ... <|im_end|>\n, an image as <|vision_start|><|image_pad|><|vision_end|>
# (the processor expands the one <|image_pad|> to one token per merged 28x28 patch).
QWEN25VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

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


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

_CORPUS_QUERIES = (
    "the skin lesion", "the lesion", "the thyroid nodule", "the nodule", "the calcaneus",
    "the heel", "the heel bone", "the fracture", "the tumor", "the mass", "the target region",
    "the abnormal region", "the finding", "the pigmented lesion", "the dark nodule",
)  # fmt: skip
_CORPUS_THOUGHTS = (
    "The lesion is near the center of the image.",
    "The nodule is a dark region in the ultrasound image.",
    "The target is small and faint, in the lower part of the X-ray.",
    "I look for the region that differs from the background.",
)


def tokenizer_corpus() -> list[str]:
    """The fixed built-in text the tiny BPE is trained on (no randomness, no seed).

    It covers what the tokenizer will see: the chat scaffold, both prompt forms, answers in both
    formats with coordinates 0..600 (digits never merge, so numbers only teach the surrounding
    punctuation), and plain JSON.
    """
    lines: list[str] = []
    for _ in range(8):
        lines += ["system\nYou are a helpful assistant.", "user\n", "assistant\n"]
    for query in _CORPUS_QUERIES:
        question = REC_QUESTION_TEMPLATE.format(query=query)
        lines.append(f"{question} {THINK_ANSWER_SUFFIX}")
        lines.append(f"{question} {BARE_LIST_SUFFIX}")
    for i in range(120):
        # A deterministic spread of boxes: (7i mod 97, 13i mod 89) + size (20 + 3i mod 60).
        x1, y1 = (7 * i) % 97, (13 * i) % 89
        w, h = 20 + (3 * i) % 60, 20 + (5 * i) % 60
        box = [x1 * 5, y1 * 5, x1 * 5 + w, y1 * 5 + h]
        lines.append(format_answer(box, "bare_list"))
        thought = _CORPUS_THOUGHTS[i % len(_CORPUS_THOUGHTS)]
        lines.append(format_answer(box, "vlm_r1_json", think_text=thought))
        lines.append(json.dumps({"bbox_2d": box, "label": _CORPUS_QUERIES[i % 15]}))
    return lines


def train_tiny_tokenizer(bpe_vocab_size: int) -> Qwen2Tokenizer:
    """Train a byte-level BPE on `tokenizer_corpus()` and wrap it as a Qwen2.5-VL tokenizer.

    The BPE uses Qwen2's normaliser (NFC), pre-tokeniser (the regex above, then byte-level) and
    decoder, so `Qwen2Tokenizer` reloads it unchanged. Special tokens are appended after the BPE
    vocabulary, as in the real tokenizer; eos = <|im_end|>, pad = <|endoftext|>, no bos (as the real
    Qwen2.5-VL tokenizer_config says).
    """
    bpe = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab_size,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    bpe.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    model_json = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = dict(model_json["vocab"])
    merges = [
        tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model_json["merges"]
    ]
    # Special tokens get the ids right after the BPE vocabulary, in Qwen2.5-VL's order.
    n_bpe = len(vocab)
    for offset, token in enumerate(QWEN25VL_SPECIAL_TOKENS):
        vocab[token] = n_bpe + offset

    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        extra_special_tokens=[t for t in QWEN25VL_SPECIAL_TOKENS if t != ENDOFTEXT],
        add_prefix_space=False,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        model_max_length=32768,
    )
    tokenizer.chat_template = QWEN25VL_CHAT_TEMPLATE
    for token in QWEN25VL_SPECIAL_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or tokenizer.convert_ids_to_tokens(token_id) != token:
            raise RuntimeError(f"special token {token} did not get an id in the tiny tokenizer")
    return tokenizer


# --------------------------------------------------------------------------------------------
# Model and processor
# --------------------------------------------------------------------------------------------


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

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / BUILD_MANIFEST).write_text(json.dumps(asdict(info), indent=2, sort_keys=True) + "\n")
        _make_readable(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _make_readable(folder: Path) -> None:
    """Give the build folder ordinary permissions (mkdtemp creates it 0700) under the umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for item in folder.iterdir():
        os.chmod(item, 0o666 & ~umask)


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
        print(f"error: {err}", file=sys.stderr)
        return 2
    info = json.loads((path / BUILD_MANIFEST).read_text())
    print(
        f"tiny model {info['size']} (seed {info['seed']}) at {path}: "
        f"{info['params_total']:,} parameters (vision {info['params_vision']:,}, "
        f"text {info['params_text']:,}), vocab {info['vocab_size']}, "
        f"{time.perf_counter() - t0:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
