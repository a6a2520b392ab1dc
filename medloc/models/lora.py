"""LoRA adapters through the ``peft`` library (``peft=lora``; docs/lora.md).

The adapters are injected into the Qwen2.5-VL model in place (``peft.inject_adapter_in_model``):
the model stays a ``Qwen2_5_VLForConditionalGeneration`` -- generation, the training forward and
DeepSpeed see the same module tree as in full fine-tuning, with each targeted ``nn.Linear``
replaced by peft's LoRA layer ``y = W x + scale * B (A dropout(x))``, ``scale = alpha / r``.
Every base parameter is frozen; only the adapter matrices A [r, in] and B [out, r] train.

What else lives here:

- the targets (:func:`lora_target_names`): the language model's projections named by
  ``peft.target_modules`` (attention q/k/v/o and MLP gate/up/down by default); the vision tower and
  its merger only with ``peft.include_vision=true`` (then every linear layer of them);
- the reference model for free (:class:`AdaptersOff`): the policy itself with the adapters
  switched off, which computes the base model's forward exactly (peft's disabled LoRA layer calls
  its base layer alone);
- the two folders a run writes: the adapter (peft's own format, ``PeftModel.from_pretrained``
  loads it; :func:`adapter_state`, :func:`save_adapter`) and a merged Hugging Face folder, whose
  weights are ``W + scale * B @ A`` (:func:`merged_state`) and which ``from_pretrained`` loads
  like any checkpoint; :func:`load_adapter_model` loads an adapter folder onto its base model.

Dimension names: r the adapter rank, in/out a linear layer's input and output features.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_NAME = "default"  # peft's name of the one adapter
# peft's saved format prefixes every key with its PeftModel wrapper's path to the base model.
PEFT_PREFIX = "base_model.model."
# The language model's projections (attention, MLP): the default targets of EasyR1, verl and
# VLM-R1's LoRA scripts on Qwen2.5-VL.
LANGUAGE_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_LORA_KEY = re.compile(r"\.(lora_[AB])\.([^.]+)\.weight$")  # ".lora_A.default.weight"


@dataclass
class LoraSpec:
    """Explicit arguments of :func:`add_lora` (the trainer fills it from ``cfg.peft``)."""

    r: int
    alpha: float
    dropout: float = 0.0
    target_modules: Sequence[str] = field(default_factory=lambda: list(LANGUAGE_PROJECTIONS))
    include_vision: bool = False
    seed: int = 0  # the adapters' random initialisation (A: Kaiming-uniform; B: zeros)

    @property
    def scale(self) -> float:
        return lora_scale(self.r, self.alpha)


def lora_scale(r: int, alpha: float) -> float:
    """peft's LoRA scaling ``alpha / r`` (no rank-stabilised variant)."""
    return float(alpha) / int(r)


def lora_target_names(linear_names: Sequence[str], *, target_modules: Sequence[str],
                      include_vision: bool, vision_prefix: str) -> list[str]:
    """Full module names of the linear layers that get an adapter, in model order.

    ``linear_names``: every ``nn.Linear`` of the model; ``target_modules``: short names (the last
    component, e.g. ``q_proj``) of the language-model layers to adapt; ``vision_prefix``: the vision
    tower's module name (``model.visual``), whose layers -- its blocks and the merger -- are
    skipped, or all adapted with ``include_vision``. The output head (``lm_head``) is never
    adapted. Raises if a target name matches no layer outside the vision tower.
    """
    inside = vision_prefix + "."
    chosen, seen = [], set()
    for name in linear_names:
        short = name.rsplit(".", 1)[-1]
        if name.startswith(inside):
            if include_vision:
                chosen.append(name)
        elif short in target_modules:
            chosen.append(name)
            seen.add(short)
    missing = [t for t in target_modules if t not in seen]
    if missing:
        raise ValueError(
            f"peft.target_modules={list(target_modules)}: {missing} match no linear layer of the "
            f"language model (its layers end in {sorted({n.rsplit('.', 1)[-1] for n in linear_names if not n.startswith(inside)})})"
        )
    return chosen


def lora_config(spec: LoraSpec, targets: Sequence[str], base_model: str | None = None) -> Any:
    """The ``peft.LoraConfig`` of ``spec`` on the full module names ``targets``."""
    from peft import LoraConfig

    return LoraConfig(r=int(spec.r), lora_alpha=spec.alpha, lora_dropout=float(spec.dropout),
                      target_modules=list(targets), bias="none", init_lora_weights=True,
                      base_model_name_or_path=base_model)


def add_lora(model: torch.nn.Module, spec: LoraSpec, *, base_model: str | None = None) -> Any:
    """Inject LoRA adapters into ``model`` in place and freeze every base parameter.

    The initialisation draws from a generator seeded with ``spec.seed`` (A Kaiming-uniform, B
    zeros, peft's default), so every rank and every run of the same seed starts from the same
    adapters, and the global random stream is left as it was. Returns the ``peft.LoraConfig``
    (``base_model``: the folder the base weights come from, recorded in the adapter folder).
    """
    from peft import inject_adapter_in_model

    from medloc.models.loading import vision_tower

    prefix = next(n for n, m in model.named_modules() if m is vision_tower(model))
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    targets = lora_target_names(linear, target_modules=spec.target_modules,
                                include_vision=spec.include_vision, vision_prefix=prefix)
    config = lora_config(spec, targets, base_model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    for name, param in model.named_parameters():  # peft froze the base; hold it to that
        if param.requires_grad != is_adapter_key(name):
            raise RuntimeError(f"after injecting LoRA, {name}.requires_grad={param.requires_grad}")
    return config


def is_adapter_key(name: str) -> bool:
    """Whether a parameter / state-dict name is a LoRA matrix (``...lora_A.default.weight``)."""
    return _LORA_KEY.search(name) is not None


def tuner_layers(model: torch.nn.Module) -> list[Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` as its base model: every LoRA layer calls its base layer alone.

    peft's switch (``enable_adapters``) also turns ``requires_grad`` of the adapters off and back on;
    the trainable set afterwards is checked to be what it was.
    """
    layers = tuner_layers(model)
    if not layers:
        raise RuntimeError(f"{type(model).__name__} has no LoRA layers to disable")
    trainable = [p.requires_grad for p in model.parameters()]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        if [p.requires_grad for p in model.parameters()] != trainable:
            raise RuntimeError("re-enabling the LoRA adapters changed which parameters train")


class AdaptersOff:
    """A view of a model with LoRA adapters in which every call runs with the adapters disabled:
    the frozen reference model of GRPO at no memory cost (it IS the base model's forward).

    It stands where a reference model stands: called, it runs the model's forward; an attribute
    that is a module is returned as such a view too, and a method is wrapped, so that e.g.
    ``view.model.get_image_features(...)`` (the vision tower) also runs with the adapters off.
    ``parameters()`` are the policy's own (no copy). ``module`` is the view itself (a DeepSpeed
    engine's ``module`` is its model; the trainer asks for it).
    """

    def __init__(self, target: torch.nn.Module, root: torch.nn.Module | None = None):
        self._target = target
        self._root = target if root is None else root

    @property
    def module(self) -> AdaptersOff:
        return self

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]:
        """The model's own parameters (nothing runs, so the adapters are not switched)."""
        return self._target.parameters(recurse)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with adapters_disabled(self._root):
            return self._target(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if isinstance(value, torch.nn.Module):
            return AdaptersOff(value, self._root)
        if callable(value) and not isinstance(value, type):
            @functools.wraps(value)
            def off(*args: Any, **kwargs: Any) -> Any:
                with adapters_disabled(self._root):
                    return value(*args, **kwargs)
            return off
        return value


# ---------------------------------------------------------------------------------------------
# state dicts: adapter file, merged weights (pure functions of a state dict)
# ---------------------------------------------------------------------------------------------


def adapter_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter matrices of a model state dict, under peft's saved names
    (``model.x.q_proj.lora_A.default.weight`` -> ``base_model.model.model.x.q_proj.lora_A.weight``)."""
    out = {}
    for key, value in state.items():
        if is_adapter_key(key):
            out[PEFT_PREFIX + _LORA_KEY.sub(r".\1.weight", key)] = value
    return out


def module_adapter_state(saved: Mapping[str, torch.Tensor], adapter_name: str = ADAPTER_NAME
                         ) -> dict[str, torch.Tensor]:
    """Inverse of :func:`adapter_state`: peft's saved names -> the injected model's names."""
    out = {}
    for key, value in saved.items():
        if not key.startswith(PEFT_PREFIX) or not re.search(r"\.lora_[AB]\.weight$", key):
            raise ValueError(f"adapter weight {key!r} is not a LoRA matrix in peft's format "
                             f"({PEFT_PREFIX}<module>.lora_A.weight / .lora_B.weight)")
        name = key[len(PEFT_PREFIX):]
        out[re.sub(r"\.(lora_[AB])\.weight$", rf".\1.{adapter_name}.weight", name)] = value
    return out


def merged_state(state: Mapping[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """The Hugging Face state dict of a LoRA model's state dict with the adapters merged.

    For each adapted layer: ``W' = W + scale * B @ A`` (W [out, in], B [out, r], A [r, in]),
    computed in float32 and stored in W's dtype, under the layer's own name
    (``x.q_proj.base_layer.weight`` -> ``x.q_proj.weight``; its bias likewise); the adapter
    matrices are dropped and every other entry is kept as it is.
    """
    lora = {}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = _LORA_KEY.search(key)
        if match:
            lora[(key[: match.start()], match.group(1))] = value
        else:
            out[key.replace(".base_layer.", ".")] = value
    layers = {layer for layer, _ in lora}
    for layer in sorted(layers):
        a, b = lora.get((layer, "lora_A")), lora.get((layer, "lora_B"))
        if a is None or b is None:
            raise ValueError(f"LoRA layer {layer} has {'no lora_A' if a is None else 'no lora_B'}")
        weight = out.get(f"{layer}.weight")
        if weight is None:
            raise ValueError(f"LoRA layer {layer} has no base weight ({layer}.base_layer.weight)")
        delta = b.float() @ a.float()  # [out, r] @ [r, in] -> [out, in]
        out[f"{layer}.weight"] = (weight.float() + scale * delta).to(weight.dtype)
    return out


def save_adapter(directory: Path, state: Mapping[str, torch.Tensor], config: Any) -> None:
    """Write an adapter folder in peft's format: ``adapter_config.json`` + ``adapter_model.safetensors``
    (``state``: a model state dict holding at least the adapter matrices)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in adapter_state(state).items()}
    if not weights:
        raise ValueError(f"no LoRA matrices in the state dict to save to {directory}")
    save_file(weights, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config.save_pretrained(str(directory))


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base_model(folder: str | Path) -> str:
    """The base model folder an adapter folder was trained on (its ``base_model_name_or_path``)."""
    config = json.loads((Path(folder) / ADAPTER_CONFIG).read_text())
    base = config.get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise FileNotFoundError(
            f"{Path(folder) / ADAPTER_CONFIG}: base_model_name_or_path={base!r} is not a folder. "
            "The adapter needs the base model it was trained on; set that field to its local "
            "folder, or evaluate the merged folder instead (the run's final/, which holds the "
            "merged weights; final/adapter is the adapter)"
        )
    return base


def load_adapter_model(folder: str | Path, *, dtype: str | torch.dtype = "float32",
                       attn_implementation: str = "auto") -> torch.nn.Module:
    """The base model of an adapter folder with the folder's adapters injected and loaded (not
    merged): the model the run trained, in eval mode."""
    from peft import LoraConfig, inject_adapter_in_model
    from safetensors.torch import load_file

    from medloc.models.loading import load_model

    folder = Path(folder)
    model = load_model(adapter_base_model(folder), dtype=dtype,
                       attn_implementation=attn_implementation)
    config = LoraConfig.from_pretrained(str(folder))
    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    state = module_adapter_state(load_file(str(folder / ADAPTER_WEIGHTS)))
    expected = {n for n, _ in model.named_parameters() if is_adapter_key(n)}
    if set(state) != expected:
        raise ValueError(
            f"{folder / ADAPTER_WEIGHTS} does not fit its adapter_config.json: missing "
            f"{sorted(expected - set(state))[:4]}, unexpected {sorted(set(state) - expected)[:4]}")
    model.load_state_dict(state, strict=False)
    return model.eval().requires_grad_(False)
