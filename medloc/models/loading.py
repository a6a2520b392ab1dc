"""Load a Qwen2.5-VL policy/reference model and its processor from a LOCAL Hugging Face folder.

The same code loads ``Qwen/Qwen2.5-VL-3B-Instruct`` (downloaded by the user beforehand) and the
embedded tiny model built by `medloc.models.tiny`; nothing here knows which one it is. Nothing
here downloads: every `from_pretrained` call is `local_files_only=True`.

Generation must never emit vision placeholders (an ``<|image_pad|>`` in a completion would ask the
forward for an image that does not exist); `vision_token_ids` lists the ids to suppress, e.g.
``model.generate(..., suppress_tokens=vision_token_ids(processor))`` or
``bad_words_ids=[[i] for i in vision_token_ids(processor)]``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
from transformers.image_utils import SizeDict
from transformers.utils import is_flash_attn_2_available

AttnImplementation = Literal["auto", "sdpa", "eager", "flash_attention_2"]
DTypeName = Literal["float32", "bfloat16", "float16"]

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

# Tokens generation must never produce: the vision block delimiters and placeholders.
VISION_TOKENS = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


def _how_to_get_weights(path: Path) -> str:
    if "standin" in path.parts:  # init_from of the embedded preset: cache/standin/<model>/final
        return (
            "It is the embedded stand-in checkpoint (SFT of the tiny model on easy phantoms; "
            "experiments/standin.yaml) that every embedded run starts from. Build it once with\n"
            "    python -m experiments.sweep standin      (about 3 min on 2 CPU cores)\n"
            "or `make prepare`; `make reproduce-*` and `make demo` build it when it is missing."
        )
    # The released checkpoint whose name the folder carries (Qwen2.5-VL-7B-Instruct, ...); 3B else.
    size = next((s for s in ("72B", "32B", "7B", "3B") if s.lower() in path.name.lower()), "3B")
    return (
        "A model path must be a local Hugging Face Qwen2.5-VL folder: config.json, the weights "
        "(model.safetensors or model-*.safetensors with model.safetensors.index.json), and the "
        "tokenizer and processor files. medloc never downloads at run time. On a machine with "
        "internet, run for example\n"
        f"    huggingface-cli download Qwen/Qwen2.5-VL-{size}-Instruct --local-dir {path}\n"
        "and copy the folder here. (The embedded default needs no weights: model=tiny_1m builds a "
        "random tiny Qwen2.5-VL at its own cache location, cache/models/tiny-1m.)"
    )


def resolve_model_path(path: str | os.PathLike[str]) -> Path:
    """Return `path` as an absolute Path if it is a complete local model folder, else raise.

    Raises FileNotFoundError naming the path, what is missing and how to get the weights.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"model folder {folder} does not exist.\n{_how_to_get_weights(folder)}"
        )
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"model folder {folder} has no config.json (is it a Hugging Face model folder?).\n"
            f"{_how_to_get_weights(folder)}"
        )
    if not any((folder / name).is_file() for name in _WEIGHT_FILES):
        raise FileNotFoundError(
            f"model folder {folder} has no weights (expected one of {list(_WEIGHT_FILES)}).\n"
            f"{_how_to_get_weights(folder)}"
        )
    return folder.resolve()


def load_processor(
    path: str | os.PathLike[str], *, min_pixels: int | None = None, max_pixels: int | None = None
) -> Any:
    """The model's `Qwen2_5_VLProcessor`, with the image pixel budget overridden if given.

    `min_pixels`/`max_pixels` bound the resized image area (docs/method.md §1: `smart_resize` rounds sides
    to multiples of patch*merge = 28 with the area clamped to [min_pixels, max_pixels]); None keeps
    the folder's value. They are set as the image processor's ``size``
    (shortest_edge = min_pixels, longest_edge = max_pixels) after loading: passing them to
    `from_pretrained` instead would make transformers 5.x re-send them on every call (deprecated),
    and a ``size=`` argument would lose against the ``min_pixels``/``max_pixels`` keys of the
    ``preprocessor_config.json`` that Qwen/Qwen2.5-VL-*-Instruct ships.
    """
    folder = resolve_model_path(path)
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    size = processor.image_processor.size
    lo = size.shortest_edge if min_pixels is None else int(min_pixels)
    hi = size.longest_edge if max_pixels is None else int(max_pixels)
    if not (lo and hi and 0 < lo <= hi):
        raise ValueError(
            f"need 0 < min_pixels <= max_pixels, got {lo}, {hi} "
            f"(arguments {min_pixels}, {max_pixels}; folder {folder})"
        )
    processor.image_processor.size = SizeDict(shortest_edge=lo, longest_edge=hi)
    return processor


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """`"float32" | "bfloat16" | "float16"` (or a torch.dtype) -> torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    allowed = get_args(DTypeName)
    if dtype not in allowed:
        raise ValueError(f"dtype={dtype!r} is not one of {list(allowed)}")
    return getattr(torch, dtype)


def resolve_attn_implementation(
    attn_implementation: str,
    *,
    dtype: torch.dtype,
    cuda_available: bool | None = None,
    flash_attn_2_available: bool | None = None,
) -> str:
    """The attention kernel to request from transformers.

    ``"auto"`` resolves only to an implementation under which generation is tested to sample what
    ``generate`` samples and to score what the training forward scores
    (``tests/integration/test_attention_contracts.py``: sdpa, eager, and flash_attention_2 through
    transformers' own FA2 path with the flash-attn kernels emulated on the CPU). The rule:

    - ``"flash_attention_2"`` when CUDA is available, the dtype is bfloat16 or float16 (flash-attn
      has no fp32 kernel) and transformers itself would run FA2 (its
      ``is_flash_attn_2_available()``: the ``flash-attn`` distribution >= 2.3.3 with CUDA; the
      FA4 package ``flash-attn-4`` also installs a ``flash_attn`` module and does not count);
    - else ``"sdpa"``.

    Never eager (the same attention as sdpa, slower), flash_attention_3/4, flex attention or a hub
    kernel: none is covered by that test. ``cuda_available`` / ``flash_attn_2_available``
    override the probes (tests).
    """
    allowed = get_args(AttnImplementation)
    if attn_implementation not in allowed:
        raise ValueError(
            f"attn_implementation={attn_implementation!r} is not one of {list(allowed)}"
        )
    if attn_implementation != "auto":
        return attn_implementation
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if flash_attn_2_available is None:
        flash_attn_2_available = is_flash_attn_2_available()
    if flash_attn_2_available and cuda and dtype in (torch.bfloat16, torch.float16):
        return "flash_attention_2"
    return "sdpa"


def load_model(
    path: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype = "float32",
    attn_implementation: str = "auto",
) -> Qwen2_5_VLForConditionalGeneration:
    """`Qwen2_5_VLForConditionalGeneration.from_pretrained(path)` on CPU, in eval mode.

    The caller (the engine) moves it to a device and switches to train mode as needed.
    """
    folder = resolve_model_path(path)
    torch_dtype = resolve_dtype(dtype)
    attn = resolve_attn_implementation(attn_implementation, dtype=torch_dtype)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        folder, dtype=torch_dtype, attn_implementation=attn, local_files_only=True
    )
    return model.eval()


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Turn on activation (gradient) checkpointing the way the update needs it: non-reentrant (the
    shared-prefix update passes the prompt's keys and values through the cache, not the layer's
    output; medloc/models/logprobs.py), and the KV cache off. transformers 5.23 renamed
    ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable`` (the old name warns
    on every call); older releases keep the old name."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def disable_dropout(model: torch.nn.Module) -> int:
    """Switch every dropout of ``model`` off, so train mode computes what eval mode computes.

    The GRPO update needs the log-probabilities of exactly the distribution the completions were
    sampled from (generation runs in eval mode): a dropout active in the update's train mode would
    make the ratio pi/pi_old and the KL estimate noisy at no benefit (TRL's ``disable_dropout``,
    OpenRLHF and verl turn it off for RL likewise). Qwen2.5-VL has no ``nn.Dropout`` module; its
    only dropout is the text attention's ``attention_dropout`` (``config.attention_dropout``, 0.0 in
    every released Qwen2.5-VL config and in the tiny/shape builds; the vision attention's is fixed
    at 0.0). Sets both kinds to 0 on the modules (the saved config is left as it is).

    Returns how many dropouts were above 0 before (0 for every model this project ships).
    """
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            changed += module.p > 0
            module.p = 0.0
        rate = getattr(module, "attention_dropout", None)
        if isinstance(rate, (int, float)) and not isinstance(rate, bool):
            changed += rate > 0
            module.attention_dropout = 0.0
    return int(changed)


def vision_token_ids(processor_or_tokenizer: Any) -> list[int]:
    """Sorted ids of `VISION_TOKENS` (vision start/end/pad, image pad, video pad) to suppress.

    Accepts a processor (uses its ``.tokenizer``) or a tokenizer. Raises if one is unknown.
    """
    tokenizer = getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)
    ids = []
    for token in VISION_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if (
            token_id is None
            or token_id == tokenizer.unk_token_id
            or (tokenizer.convert_ids_to_tokens(token_id) != token)
        ):
            raise ValueError(f"tokenizer has no token {token}; is this a Qwen2.5-VL tokenizer?")
        ids.append(int(token_id))
    return sorted(ids)


def vision_tower(model: torch.nn.Module) -> torch.nn.Module:
    """The vision encoder (patch embed, blocks, 2x2 merger) of a Qwen2.5-VL model."""
    inner = getattr(model, "model", model)
    visual = getattr(inner, "visual", None)
    if visual is None:
        raise AttributeError(f"{type(model).__name__} has no vision tower at .model.visual")
    return visual


def freeze_vision_tower(model: torch.nn.Module) -> int:
    """Set requires_grad=False on every vision-tower parameter (incl. the merger).

    Returns the number of parameter elements frozen.
    """
    frozen = 0
    for param in vision_tower(model).parameters():
        param.requires_grad_(False)
        frozen += param.numel()
    return frozen
