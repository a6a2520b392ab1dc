"""`make bench-gpu`: one GRPO step of the trainer against floors that do the same work.

    python -m experiments.bench_gpu                  # random-weight Qwen2.5-VL-3B shape, one GPU
    python -m experiments.bench_gpu --shape 7b       # the 7B shape
    python -m experiments.bench_gpu --shape tiny     # the embedded tiny model on CPU (< 1 min)
    python -m experiments.bench_gpu -- engine=zero3  # any config override after --

The reference configuration: 4 prompts x G=8, phantom HAM10000 images at 600x450 (588x448 for the
model: 336 image tokens), 128 new tokens forced (a random model never stops; EOS is banned until
then, as ``make bench`` does), micro-batch 8, gradient checkpointing on, bf16, sdpa,
``engine=auto``, no checkpoints, no evaluation. ``--shape tiny`` runs the same on the tiny model
(fp32, CPU, 112x112 images, 24 new tokens, ZeRO-0).

In ONE process: first ``--warmup`` + ``--steps`` trainer steps (``GRPOTrainer.train_step``, each
phase timed after a device synchronisation). Hooks on the vision tower and the language model
record what each phase of the trainer ran through the model: tower calls (images each) and
language-model forwards (rows x tokens each). Then the floors, each doing exactly that work with
plain torch and transformers on a second, plain copy of the model (same weights, dtype,
attention, gradient checkpointing, frozen parts and adapters; no DeepSpeed, so none of its hooks
fire), warmed up once, then the median of ``--repeats`` (>= 3) runs:

- generate: the phase's own processor call, transformers' ``generate`` for the sampling, and the
  trainer's decoding and scoring of the completions. The sampling does what the trainer's sampler
  does -- the vision tower once per image, the prompt prefilled once per prompt into a static
  cache, that cache copied for the G samples, then ``generate`` continuing from it on the B*G rows
  (same sampling settings, same banned tokens, same forced length). On a GPU ``generate``
  compiles its decode step for a static cache; the warm-up run takes the compilation.
- reference: the reference phase's recorded tower calls and no-grad forwards (the reference's own
  tower once per image, the old policy's forwards when mu > 1, ...), replayed in order over the
  same rows and micro-batches, with the trainer's log-prob arithmetic. Under
  ``grpo.shared_prefix_update`` (default) a micro-batch's forward is two recorded calls, a prefix
  over its prompts ``[b, P]`` with a KV cache and the completion pass ``[n, L-1]`` over that cache
  repeated per row; the floor replays the pair as the same two passes (``update_forwards``).
- policy: the policy phase's recorded tower calls and forwards replayed with grad in train mode,
  each micro-batch's loss backpropagated once, a tower's output shared by several forwards
  backpropagated once (what a tower run once per image must do).
- optimizer: ``step()`` of the trainer's own optimizer (the one inside DeepSpeed's wrapper: torch
  AdamW, or DeepSpeed's CPU Adam under optimizer offload) over its own state, with zero gradients
  put in place. When those gradients do not fit beside the trainer, a torch AdamW step over a
  slice of the element count, scaled up, and the table says so.

Counts are read from the trainer, not assumed: when the trainer changes what its phases run (a
tower once per image in the update; one prompt forward per group), the floors follow the recorded
calls, and the work table shows the trainer's and the floor's calls side by side (they must be
equal; the test checks it on the tiny model).

It prints two labelled tables (times with the trainer/floor ratio; the work of each phase) and
writes everything as JSON to ``--out`` (default ``runs/bench/gpu_step.json``, written
atomically), with the peak of ``torch.cuda.max_memory_allocated`` over the trainer's steps and
over each floor. Nothing is asserted about speed: the numbers are for reading (a test runs
``--shape tiny`` so the script cannot rot).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medloc.atomic import write_json_atomic
from medloc.logging import console

CONF = Path(__file__).resolve().parents[1] / "conf"
SHAPE_NAMES = {"3b": "qwen2.5-vl-3b", "7b": "qwen2.5-vl-7b", "tiny": "tiny-1m"}
FLOORS = ("generate", "reference", "policy", "optimizer")
MIN_REPEATS = 3  # medians of at least 3 runs


def overrides_for(shape: str, model_dir: Path, data_root: Path) -> list[str]:
    """Config overrides of the reference configuration for ``shape``."""
    common = [
        f"data_root={data_root}", f"cache_dir={data_root}", "trainer.prompts_per_step=4",
        "grpo.num_generations=8", "model.micro_batch_size=8", "model.gradient_checkpointing=true",
        "trainer.save_every=0", "trainer.eval_after=false", "trainer.sample_every=0",
        "logger.progress=false", "dataset.phantom.n_images=32", "dataset.phantom.preset=easy",
    ]
    if shape == "tiny":
        return ["debug=cpu_tiny", "engine=zero0", "grpo.max_new_tokens=24", *common]
    return [
        "preset=paper", "dataset=phantom_ham10000", f"model.path={model_dir}",
        "model.build_tiny=null", "model.precision=bf16", "model.attn_implementation=sdpa",
        "grpo.max_new_tokens=128", "dataset.phantom.image_size=[600,450]",
        "dataset.min_pixels=3136", "dataset.max_pixels=1003520", "reward.answer_format=bare_list",
        *common,
    ]


def parse_floors(text: str) -> tuple[str, ...]:
    """``--floors``: "all", "none" or a comma list of ``FLOORS``."""
    if text == "all":
        return FLOORS
    if text == "none":
        return ()
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in names if s not in FLOORS]
    if bad or not names:
        raise ValueError(f"--floors {text!r}: expected 'all', 'none' or a comma list of {FLOORS}")
    return names


# ---------------------------------------------------------------------------------------------
# timing and memory
# ---------------------------------------------------------------------------------------------


def _sync() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls (a compiled
    path compiles in the warm-up, never inside the median)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = _sync()
        fn()
        times.append(_sync() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------
# what a phase runs through the model
# ---------------------------------------------------------------------------------------------


@dataclass
class Work:
    """The calls one phase made into the model, in order: ``("tower", images)`` for a vision-tower
    run over that many images, ``("lm", rows, tokens)`` for a language-model forward over a
    [rows, tokens] batch (a decode step of the fast sampler calls the layers directly and is not
    a forward: the generate phase's decode is counted by the sampler's rows and steps)."""

    calls: list[tuple] = field(default_factory=list)

    def towers(self) -> list[int]:
        return [c[1] for c in self.calls if c[0] == "tower"]

    def forwards(self) -> list[tuple[int, int]]:
        return [(c[1], c[2]) for c in self.calls if c[0] == "lm"]

    def summary(self) -> dict[str, Any]:
        fwd = self.forwards()
        return {"tower_calls": len(self.towers()), "tower_images": sum(self.towers()),
                "lm_forwards": len(fwd), "lm_rows_x_tokens": [list(f) for f in fwd],
                "lm_tokens": sum(r * t for r, t in fwd)}


def _grid_rows(args: tuple, kwargs: dict[str, Any]) -> int:
    grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
    if grid is None:
        raise RuntimeError("vision tower called without grid_thw: cannot count its images")
    return int(grid.shape[0])


def _lm_shape(args: tuple, kwargs: dict[str, Any]) -> tuple[int, int]:
    x = kwargs.get("inputs_embeds")
    if x is None:
        x = kwargs.get("input_ids", args[0] if args else None)
    if x is None:
        raise RuntimeError("language model called without input_ids or inputs_embeds")
    return int(x.shape[0]), int(x.shape[1])


class Recorder:
    """Forward pre-hooks on the vision tower and the language model of one or more models,
    appending each call to the ``Work`` of the phase set by ``in_phase``. In the phase "update"
    a call under ``torch.no_grad`` belongs to "reference" and one with grad to "policy"."""

    def __init__(self) -> None:
        self.phase: str | None = None
        self.work: dict[str, Work] = {}
        self._handles: list[Any] = []
        self._hooked: set[int] = set()

    def attach(self, model: torch.nn.Module) -> None:
        from medloc.models.loading import vision_tower

        tower, lm = vision_tower(model), model.model.language_model
        if id(tower) in self._hooked:
            return  # the same model (e.g. LoRA's reference is the policy with adapters off)
        self._hooked.update({id(tower), id(lm)})
        self._handles.append(tower.register_forward_pre_hook(
            lambda _m, a, kw: self._add(("tower", _grid_rows(a, kw))), with_kwargs=True))
        self._handles.append(lm.register_forward_pre_hook(
            lambda _m, a, kw: self._add(("lm", *_lm_shape(a, kw))), with_kwargs=True))

    def _add(self, call: tuple) -> None:
        if self.phase is None:
            return
        phase = self.phase
        if phase == "update":
            phase = "policy" if torch.is_grad_enabled() else "reference"
        self.work.setdefault(phase, Work()).calls.append(call)

    def in_phase(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kw: Any) -> Any:
            self.phase = phase
            try:
                return fn(*args, **kw)
            finally:
                self.phase = None
        return wrapped

    def take(self) -> dict[str, Work]:
        work, self.work = self.work, {}
        return work

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._hooked.clear()


def tower_kind(tower_images: int, images: int, group: int, start: int, rows: int) -> str:
    """How a tower run over ``tower_images`` images maps onto the rows of the forward that follows
    it (rows ``start`` .. ``start + rows``; row r shows image r // G, G = ``group``, of ``images``
    distinct images in the batch):

    - "images": once per image of the batch (row r takes output r // G);
    - "prompts": once per image of the forward's own rows (row r takes r // G - start // G);
    - "rows": once per row of the forward (row r takes r - start, each row its own copy). The
      trainer's update no longer does this (its tower runs once per image per micro-batch,
      "prompts", or once per image of the step, "images"); kept for a recorded phase that does.

    ``rows``: the rows the forward's log-probs cover (a shared-prefix pair: its completion pass).
    """
    own = (start + rows - 1) // group - start // group + 1  # distinct images of those rows
    if tower_images == images:
        return "images"
    if tower_images == own:
        return "prompts"
    if tower_images == rows:
        return "rows"
    raise ValueError(
        f"a tower run over {tower_images} images before a forward over rows {start}..{start + rows}"
        f" (G={group}): expected the batch's {images} images, the forward's {own} or its {rows} "
        "rows"
    )


def feature_index(kind: str, row: int, group: int, start: int) -> int:
    """Which output of a tower run of ``kind`` (``tower_kind``; the forward started at row
    ``start``) feeds ``row``."""
    if kind == "images":
        return row // group
    if kind == "prompts":
        return row // group - start // group
    if kind == "rows":
        return row - start
    raise ValueError(f"kind={kind!r}: expected images, prompts or rows")


# ---------------------------------------------------------------------------------------------
# floors
# ---------------------------------------------------------------------------------------------


def update_forwards(calls: Sequence[tuple], prompt_tokens: int, completion_tokens: int
                    ) -> list[tuple]:
    """The recorded calls of a reference or policy phase as the log-prob forwards they made:

    - ``("tower", images)``: a vision-tower run, as recorded;
    - ``("full", rows)``: one forward over ``[rows, P+L]`` (``completion_logprobs``:
      ``grpo.shared_prefix_update=false``);
    - ``("shared", prompts, rows)``: a prefix forward over ``[prompts, P]`` followed by the
      completion forward over ``[rows, L-1]`` (``shared_prefix_logprobs``, the default).

    P = ``prompt_tokens``, L = ``completion_tokens``. A language-model call fitting neither
    (a prefix with no completion pass after it, any other length) raises ``ValueError``.
    """
    if completion_tokens < 2:
        raise ValueError(f"completion_tokens={completion_tokens}: the update floors need >= 2 "
                         "(a shared-prefix update with L=1 makes no completion forward)")
    p, length = prompt_tokens, completion_tokens
    out: list[tuple] = []
    i = 0
    while i < len(calls):
        call = calls[i]
        if call[0] == "tower":
            out.append(call)
            i += 1
            continue
        _, rows, tokens = call
        nxt = calls[i + 1] if i + 1 < len(calls) else None
        if tokens == p and nxt is not None and nxt[0] == "lm" and nxt[2] == length - 1:
            if nxt[1] < rows:
                raise ValueError(f"recorded call {i}: a prefix over {rows} prompts before a "
                                 f"completion forward over {nxt[1]} rows (expected >= {rows})")
            out.append(("shared", rows, nxt[1]))
            i += 2
        elif tokens == p + length:
            out.append(("full", rows))
            i += 1
        else:
            raise ValueError(
                f"recorded call {i}: a language-model forward over {rows} x {tokens} tokens; "
                f"expected {p + length} (prompt {p} + completion {length}) or a prefix of {p} "
                f"followed by a completion forward of {length - 1}")
    return out


def replay(work: Work, model: torch.nn.Module, batch: dict[str, torch.Tensor], *, group: int,
           features: Sequence[torch.Tensor], temperature: float, suppress: Sequence[int],
           grad: bool, trainable_tower: bool) -> None:
    """Run the calls of ``work`` (a reference or policy phase) on ``model`` over ``batch``'s rows.

    The calls are read as forwards (``update_forwards``). Tower calls run the tower (with grad
    when ``grad`` and ``trainable_tower``); each forward takes its rows in order through the batch
    (``collate.slice_batch``; rows wrap, so mu passes or an old-policy forward beside the
    reference's reuse them) with the latest tower output's features, or with ``features`` (the
    rollout's, one per image) when the phase ran no tower before it. A "full" forward is
    ``completion_logprobs`` over prompt + completion (the features one per row); a "shared" one is
    ``shared_prefix_logprobs`` as the trainer calls it -- the prefix pass over the rows' prompts
    with a KV cache, then the completion pass over that cache repeated per row (the features one
    per prompt). With ``grad`` each forward's loss (one per micro-batch, as the trainer's) is
    backpropagated once into the features, and a tower output is backpropagated once, after the
    last forward that used it (or at the end), as a tower shared by several forwards must be.
    """
    from medloc.data.collate import every_nth_row, slice_batch
    from medloc.generation import image_features
    from medloc.models.logprobs import completion_logprobs, row_groups, shared_prefix_logprobs

    n, length = batch["completion_mask"].shape
    p = batch["input_ids"].shape[1] - length
    images = n // group
    row = 0
    feats: tuple[torch.Tensor, ...] | None = None
    kind, base = "images", 0  # how the latest tower output maps onto rows (tower_kind)
    tower_out: torch.Tensor | None = None  # the latest tower output, kept for its backward
    leaf: torch.Tensor | None = None

    def flush() -> None:
        nonlocal tower_out, leaf
        if tower_out is not None and leaf is not None and leaf.grad is not None:
            tower_out.backward(leaf.grad)
        tower_out = leaf = None

    def feature_of(r: int) -> torch.Tensor:
        return features[r // group] if feats is None else feats[feature_index(kind, r, group, base)]

    steps = update_forwards(work.calls, p, length)
    for i, step in enumerate(steps):
        if step[0] == "tower":
            flush()
            m = step[1]
            base = row % n
            nxt = next((c for c in steps[i + 1:] if c[0] != "tower"), None)
            kind = tower_kind(m, images, group, base, nxt[-1] if nxt else m)
            if kind == "images":
                src = every_nth_row(batch, group)
            elif kind == "prompts":
                first = base // group * group
                src = every_nth_row(slice_batch(batch, first, first + m * group), group)
            else:
                src = slice_batch(batch, base, base + m)
            with torch.set_grad_enabled(grad and trainable_tower):
                out = image_features(model, src)  # m tensors [tokens_i, H]
            sizes = [f.shape[0] for f in out]
            if grad and trainable_tower:
                tower_out = torch.cat(out)  # [tokens, H]
                leaf = tower_out.detach().requires_grad_(True)
                feats = tuple(leaf.split(sizes))
            else:
                feats = tuple(f.detach() for f in out)
            continue
        rows = step[-1]
        start = row % n
        if start + rows > n:
            raise ValueError(f"a recorded forward over {rows} rows from row {start} runs past the "
                             f"batch's {n} rows (micro-batches must tile the batch)")
        part = slice_batch(batch, start, start + rows)
        with torch.set_grad_enabled(grad):
            if step[0] == "full":
                logp = completion_logprobs(
                    model, part, temperature=temperature, suppress_token_ids=suppress,
                    image_features=[feature_of(r) for r in range(start, start + rows)])  # [rows, L]
            else:
                firsts, _ = row_groups(range(start, start + rows), group)
                if len(firsts) != step[1]:
                    raise ValueError(f"recorded prefix over {step[1]} prompts for rows "
                                     f"{start}..{start + rows}, which show {len(firsts)} (G={group})")
                logp = shared_prefix_logprobs(
                    model, part, range(start, start + rows), group, temperature=temperature,
                    suppress_token_ids=suppress,
                    prompt_features=[feature_of(start + f) for f in firsts])  # [rows, L]
            if grad:
                mask = part["completion_mask"].to(logp.device)  # [rows, L]
                ((logp * mask).sum() / mask.sum().clamp(min=1)).backward()
        row += rows
    flush()
    if grad:
        for prm in model.parameters():
            prm.grad = None


class PrefixSampler:
    """transformers' ``generate`` doing the trainer's sampling work: the vision tower once per image,
    each prompt prefilled once into a static cache, the first token of the G samples drawn from
    the prefill's logits (as the trainer does), the cache copied in place for the G samples into
    one [B*G, K] static cache kept across calls (fixed addresses: a compiled decode step replays
    its CUDA graphs instead of recording new ones), then ``generate`` continues from that first
    token on the B*G rows for the remaining tokens."""

    def __init__(self, model: torch.nn.Module, group: int, max_new_tokens: int) -> None:
        if max_new_tokens < 2:
            raise ValueError(f"max_new_tokens={max_new_tokens}: the generate floor needs >= 2")
        self.model, self.group, self.max_new_tokens = model, group, max_new_tokens
        self.cache: Any = None
        self.work = Work()  # what the last call ran (its own calls, not hooks: see run)

    def _repeated_cache(self, prefilled: Any) -> Any:
        from medloc.generation import _repeat_cache

        g = self.group
        if self.cache is None:
            _repeat_cache(prefilled, g, static=True)  # [B*G, heads, K, d] per layer
            self.cache = prefilled
            return prefilled
        for src, dst in zip(prefilled.layers, self.cache.layers, strict=True):
            b = src.keys.shape[0]
            dst.keys.view(b, g, *dst.keys.shape[1:]).copy_(src.keys[:, None])  # [B, G, heads, K, d]
            dst.values.view(b, g, *dst.values.shape[1:]).copy_(src.values[:, None])
            dst.cumulative_length.copy_(src.cumulative_length)
        return self.cache

    @torch.no_grad()
    def __call__(self, prompt_batch: dict[str, torch.Tensor], *, temperature: float, top_p: float,
                 banned: Sequence[int], eos_token_id: int | Sequence[int], pad_token_id: int
                 ) -> torch.Tensor:
        from transformers.cache_utils import StaticCache

        from medloc.generation import ban_mask, encoder_outputs, image_features, next_tokens

        model, g, new = self.model, self.group, self.max_new_tokens
        device = next(model.parameters()).device
        ids = prompt_batch["input_ids"].to(device)  # [B, P]
        mask = prompt_batch["attention_mask"].to(device)  # [B, P]
        types = prompt_batch["mm_token_type_ids"].to(device)  # [B, P]
        grid = prompt_batch["image_grid_thw"].to(device)  # [B, 3]
        b, p = ids.shape
        feats = image_features(model, prompt_batch)  # B tensors: the tower once per image
        kv = StaticCache(config=model.config, max_cache_len=p + new)
        logits = model(input_ids=ids, attention_mask=mask, mm_token_type_ids=types,
                       image_grid_thw=grid, mm_encoder_outputs=encoder_outputs(feats),
                       past_key_values=kv, use_cache=True, logits_to_keep=1
                       ).logits[:, -1].float()  # [B, V]: the prefill, once per prompt
        self.work = Work([("tower", b), ("lm", b, p)])
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        first, _ = next_tokens(logits.repeat_interleave(g, dim=0),
                               banned=ban_mask(logits.shape[-1], [*banned, *eos], device),
                               do_sample=True, temperature=temperature, top_p=top_p)  # [N]
        kv = self._repeated_cache(kv)
        # generate takes the M-RoPE offsets of a cached prefix from the model: one per row
        model.model.rope_deltas = model.model.rope_deltas.repeat_interleave(g, dim=0)  # [N, 1]
        rep = {k: v.repeat_interleave(g, dim=0) for k, v in (("ids", ids), ("mask", mask),
                                                             ("types", types))}  # [N, P] each
        out = model.generate(
            input_ids=torch.cat([rep["ids"], first[:, None]], dim=1),  # [N, P+1]
            attention_mask=torch.cat([rep["mask"], rep["mask"].new_ones(b * g, 1)], dim=1),
            mm_token_type_ids=torch.cat([rep["types"], rep["types"].new_zeros(b * g, 1)], dim=1),
            image_grid_thw=grid.repeat_interleave(g, dim=0), past_key_values=kv, use_cache=True,
            do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
            max_new_tokens=new - 1, min_new_tokens=new - 1,
            suppress_tokens=list(banned) or None, eos_token_id=eos, pad_token_id=pad_token_id,
        )  # [N, P + L]
        return out[:, p:].cpu()  # [N, L]


def innermost_optimizer(opt: Any) -> torch.optim.Optimizer:
    """The optimizer that does the arithmetic inside DeepSpeed's wrappers (``.optimizer`` chain)."""
    for _ in range(8):
        inner = getattr(opt, "optimizer", None)
        if isinstance(opt, torch.optim.Optimizer) and not isinstance(inner, torch.optim.Optimizer):
            return opt
        if inner is None:
            break
        opt = inner
    raise TypeError(f"no torch optimizer inside {type(opt).__name__}")


def optimizer_floor(engine: Any, repeats: int) -> tuple[float, str]:
    """Median time of the trainer's own optimizer stepping over its own state (zero gradients put
    where it has none; removed again), or, when those gradients do not fit in the free memory, of
    a torch AdamW over 1/8 of the element count, times 8. Returns (seconds, what was timed).

    The state it steps is what DeepSpeed hands it: the fp32 partitions in its param groups
    (ZeRO-0/1/2, bf16), or, under ZeRO-3, each sub-group's fp32 partition put into its param
    group for one ``step()`` and taken out again (``fp32_partitioned_groups_flat``), as
    DeepSpeed's ``_optimizer_step`` does.
    """
    import psutil

    wrapper = engine.optimizer
    basic = innermost_optimizer(engine.policy.basic_optimizer or wrapper)
    flat = getattr(wrapper, "fp32_partitioned_groups_flat", None)  # ZeRO-3
    if flat is not None:
        targets = [(wrapper.sub_group_to_group_id[i], [t]) for i, t in enumerate(flat)]
    else:
        targets = [(i, list(group["params"])) for i, group in enumerate(basic.param_groups)]
    params = [p for _, ts in targets for p in ts]
    missing = [p for p in params if p.grad is None]
    need: dict[str, int] = {}
    for p in missing:
        need[p.device.type] = need.get(p.device.type, 0) + p.numel() * p.element_size()
    free = {"cpu": psutil.virtual_memory().available}
    if torch.cuda.is_available():
        free["cuda"] = torch.cuda.mem_get_info()[0]
    numel = sum(p.numel() for p in params)

    def step() -> None:
        if flat is None:
            basic.step()
            return
        for gid, ts in targets:
            group = basic.param_groups[gid]
            kept, group["params"] = group["params"], ts
            try:
                basic.step()
            finally:
                group["params"] = kept

    if all(need[d] < 0.8 * free.get(d, 0) for d in need):
        for p in missing:
            p.grad = torch.zeros_like(p)
        try:
            t = median_time(step, repeats)
        finally:
            for p in missing:
                p.grad = None
        return t, f"{type(basic).__name__}.step over the trainer's {numel / 1e6:,.1f}M elements"
    device = params[0].device
    part = max(1, numel // 8)
    slice_ = torch.zeros(part, dtype=torch.float32, device=device, requires_grad=True)
    slice_.grad = torch.zeros_like(slice_)
    opt = torch.optim.AdamW([slice_], lr=1e-6)
    t = 8 * median_time(opt.step, repeats)
    del opt, slice_
    return t, (f"torch AdamW over 1/8 of {numel / 1e6:,.1f}M elements x 8 (the trainer's "
               f"{type(basic).__name__} gradients did not fit beside it)")


def plain_copy(trainer: Any, model_dir: Path, device: torch.device) -> torch.nn.Module:
    """The trainer's model as plain torch: same weights file, dtype, attention, frozen tower,
    adapters and gradient checkpointing; no DeepSpeed."""
    from medloc.models.loading import (
        disable_dropout,
        enable_checkpointing,
        freeze_vision_tower,
        load_model,
    )

    spec = trainer.engine.spec
    dtype = torch.bfloat16 if spec.precision == "bf16" else torch.float32
    model = load_model(model_dir, dtype=dtype, attn_implementation=spec.attn_implementation)
    if spec.freeze_vision:
        freeze_vision_tower(model)
    disable_dropout(model)
    if spec.lora is not None:
        from medloc.models.lora import add_lora

        add_lora(model, spec.lora)
    if spec.gradient_checkpointing:
        enable_checkpointing(model)
    return model.to(device)


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------


def build_model(shape: str, model_dir: Path) -> Path:
    if shape == "tiny":
        from medloc.models.tiny import build_tiny_model

        return build_tiny_model(model_dir, size="tiny-1m", seed=0)
    from medloc.models.shapes import build_random_shape

    return build_random_shape(model_dir, shape=SHAPE_NAMES[shape])


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def model_and_config(shape: str, workdir: Path, extra: list[str]) -> tuple[Path, Any]:
    """The random model of ``shape`` (built once under ``workdir``), the reference configuration
    composed for it with ``extra`` overrides, and its dataset prepared."""
    from hydra import compose, initialize_config_dir

    from data_prep.build import ensure_dataset
    from medloc.config import register_configs, to_run_config

    model_dir = build_model(shape, workdir / "model")
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = to_run_config(compose(config_name="config",
                                    overrides=[*overrides_for(shape, model_dir, workdir), *extra]))
    ensure_dataset(cfg.dataset)
    return model_dir, cfg


def run(shape: str, steps: int, warmup: int, workdir: Path, extra: list[str], *,
        repeats: int = MIN_REPEATS, floors: Sequence[str] = FLOORS) -> dict[str, Any]:

    from medloc import runtime
    from medloc.data.collate import append_completions, encode_prompts
    from medloc.data.prompts import build_messages
    from medloc.grpo import rollout as rollout_module
    from medloc.grpo.trainer import GRPOTrainer

    model_dir, cfg = model_and_config(shape, workdir, extra)
    gc = cfg.grpo
    g, new_tokens, mb = gc.num_generations, gc.max_new_tokens, cfg.model.micro_batch_size

    # Equal work every step: EOS banned until max_new_tokens (a random model rarely stops anyway).
    clock: dict[str, float] = {}
    captured: dict[str, Any] = {}
    real_generate = rollout_module.generate

    def forced_generate(model, prompt_batch, **kw):
        t0 = _sync()
        out = real_generate(model, prompt_batch, **{**kw, "min_new_tokens": kw["max_new_tokens"]})
        clock["sampling_s"] = clock.get("sampling_s", 0.0) + _sync() - t0
        return out

    rollout_module.generate = forced_generate
    recorder = Recorder()
    trainer = None
    try:
        trainer = GRPOTrainer(cfg, workdir / "run", str(model_dir))
        recorder.attach(trainer.engine.module)
        reference = trainer.engine.reference
        if reference is not None:
            recorder.attach(getattr(reference, "module", reference))
        real_sample, real_update = trainer.sample, trainer.update
        real_micro_step = trainer.engine.micro_step

        def sample(records, images):
            captured["records"], captured["images"] = records, images
            captured["rollout"] = ro = real_sample(records, images)
            return ro

        def update(batch, adv, dead, image_features=None):
            captured["features"] = image_features
            return real_update(batch, adv, dead, image_features=image_features)

        def micro_step(**kw):
            t0 = _sync()
            real_micro_step(**kw)
            clock["optimizer_s"] = clock.get("optimizer_s", 0.0) + _sync() - t0

        trainer.sample = recorder.in_phase("generate", sample)
        trainer.update = recorder.in_phase("update", update)
        trainer.engine.micro_step = micro_step
        per_step: list[dict[str, Any]] = []
        work: dict[str, Work] = {}
        for step in range(warmup + steps):
            runtime.seed_step(cfg.seed, step, 0)
            clock.clear()
            _reset_peak()
            t0 = _sync()
            m = trainer.train_step(step)
            wall = _sync() - t0
            work = recorder.take()
            if step >= warmup:
                per_step.append({
                    "step_s": wall, "generate_s": m["time/generate_s"],
                    "sampling_s": clock.get("sampling_s"),
                    "reference_s": m.get("time/reference_s", 0.0),
                    "policy_s": m.get("time/policy_s", 0.0),
                    "optimizer_s": clock.get("optimizer_s", 0.0),
                    "policy_fwd_bwd_s": m.get("time/policy_s", 0.0) - clock.get("optimizer_s", 0.0),
                    "peak_gib": _peak_gib(),
                    "generate_tokens_per_s": m["time/generate_tokens_per_s"],
                })
    finally:
        rollout_module.generate = real_generate
        recorder.detach()
    med = {k: _median(per_step, k) for k in per_step[0]}
    trainer_peak = max((r["peak_gib"] for r in per_step if r["peak_gib"] is not None), default=None)

    # ---- floors on a plain copy of the model, the last step's rows and recorded work
    ro = captured["rollout"]
    batch = ro.batch
    n, length = batch["completion_mask"].shape
    device = trainer.engine.device
    tok = trainer.processor.tokenizer
    suppress = list(trainer.suppress)
    floor_s: dict[str, float] = {}
    floor_peak: dict[str, float | None] = {}
    floor_work: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    errors: dict[str, str] = {}
    plain = plain_copy(trainer, model_dir, device) if set(floors) - {"optimizer"} else None
    # The replayed floors' calls are recorded by hooks on the plain model, attached only after
    # the generate floor: a hook inside generate's compiled decode step would be traced into it.
    floor_rec = Recorder()

    def timed(name: str, fn: Callable[[], Any], work_of: Callable[[], Work] | None = None) -> None:
        _reset_peak()
        try:
            floor_s[name] = median_time(fn, repeats)
            floor_peak[name] = _peak_gib()
            if work_of is not None:
                floor_work[name] = work_of().summary()
                return
            # one more run, recorded: the floor's own calls, to set beside the trainer's
            floor_rec.take()
            floor_rec.phase = name
            try:
                fn()
            finally:
                floor_rec.phase = None
            floor_work[name] = floor_rec.take().get(name, Work()).summary()
        except Exception as err:  # noqa: BLE001 - one floor failing (a first GPU run) keeps the others
            errors[name] = f"{type(err).__name__}: {err}"
            floor_s.pop(name, None)
            console(f"[bench] floor {name!r} failed: {errors[name]}")

    if "generate" in floors:
        plain.eval()
        sampler = PrefixSampler(plain, g, new_tokens)
        records, images = captured["records"], captured["images"]
        parts: dict[str, list[float]] = {}

        def generate_phase() -> None:
            messages = [build_messages(r.query, im, cfg.reward.answer_format)
                        for r, im in zip(records, images)]
            prompt_batch = encode_prompts(trainer.processor, images, messages)  # the processor
            t0 = _sync()
            completion = sampler(prompt_batch, temperature=gc.temperature, top_p=gc.top_p,
                                 banned=suppress, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)  # [N, L]
            parts.setdefault("sampling", []).append(_sync() - t0)
            if tuple(completion.shape) != (n, new_tokens):
                raise RuntimeError(f"generate floor sampled {tuple(completion.shape)}, "
                                   f"expected {(n, new_tokens)}")
            full = append_completions(prompt_batch, completion, pad_id=tok.pad_token_id,
                                      eos_id=tok.eos_token_id, repeat=g)
            texts = tok.batch_decode(completion, skip_special_tokens=True)
            rollout_module.score(texts, answer_format=cfg.reward.answer_format,
                                 parse_rule=cfg.reward.parse_rule, input_hw=full["input_hw"],
                                 orig_hw=[(r.height, r.width) for r in records for _ in range(g)],
                                 gt_boxes=ro.gt_boxes)

        timed("generate", generate_phase, work_of=lambda: sampler.work)
        if "generate" in floor_s:
            samples = parts["sampling"][1:1 + repeats]  # the timed runs (not the warm-up)
            floor_s["sampling"] = statistics.median(samples)
            compiled = ("its decode step compiled by transformers (static cache on CUDA), the "
                        "compilation in the warm-up run" if torch.cuda.is_available()
                        else "not compiled (CPU)")
            notes.append(f"generate floor: transformers' generate from a once-per-prompt "
                         f"prefill, {compiled}; warm-up {parts['sampling'][0]:.2f} s")
        sampler.cache = None

    if plain is not None:
        floor_rec.attach(plain)
    features = [f.detach() for f in (captured.get("features") or ro.image_features)]
    trainable_tower = any(p.requires_grad for p in _tower_params(plain)) if plain else False
    for name, grad in (("reference", False), ("policy", True)):
        if name not in floors or name not in work:
            continue
        plain.train(grad)

        def fn(name=name, grad=grad) -> None:
            replay(work[name], plain, batch, group=g, features=features,
                   temperature=gc.temperature, suppress=suppress, grad=grad,
                   trainable_tower=trainable_tower)

        timed(name, fn)
    if plain is not None:
        floor_rec.detach()
        del plain
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    if "optimizer" in floors:
        _reset_peak()
        try:
            floor_s["optimizer"], what = optimizer_floor(trainer.engine, repeats)
            floor_peak["optimizer"] = _peak_gib()
            notes.append(f"optimizer floor: {what}")
        except Exception as err:  # noqa: BLE001 - as for the other floors
            errors["optimizer"] = f"{type(err).__name__}: {err}"
            console(f"[bench] floor 'optimizer' failed: {errors['optimizer']}")

    trainer_work = {k: w.summary() for k, w in work.items()}
    table = _table(med, floor_s, floor_peak, trainer_peak, n * length)
    spec = trainer.engine.spec
    trainable = sum(p.numel() for p in trainer.engine.module.parameters() if p.requires_grad)
    return {
        "shape": shape, "device": torch.cuda.get_device_name() if torch.cuda.is_available()
        else "cpu", "engine_zero_stage": spec.zero_stage,
        "offload_optimizer": spec.offload_optimizer, "offload_params": spec.offload_params,
        "rows": n, "prompts": n // g, "group": g,
        "prompt_tokens": int(batch["input_ids"].shape[1] - length),
        "completion_tokens": length, "micro_batch": mb, "steps": steps, "warmup": warmup,
        "repeats": repeats, "trainable_params": trainable, "trainer_median": med,
        "trainer_peak_gib": trainer_peak, "per_step": per_step, "floors_s": floor_s,
        "floor_peak_gib": floor_peak, "floor_errors": errors, "notes": notes,
        "work": {"trainer": trainer_work, "floor": floor_work}, "table": table,
    }


def _tower_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    from medloc.models.loading import vision_tower

    return list(vision_tower(model).parameters())


def _table(med: dict[str, float | None], floor_s: dict[str, float],
           floor_peak: dict[str, float | None], trainer_peak: float | None,
           decoded_tokens: int) -> list[dict[str, Any]]:
    """Rows of the time table: phase, trainer median, floor median, ratio trainer/floor."""
    parts = ("generate", "reference", "policy", "optimizer")
    all_floors = all(p in floor_s for p in parts)
    rows = [
        ("generate", "generate (processor, sampling, scoring)", med["generate_s"], "generate"),
        ("sampling", "  of which sampling", med["sampling_s"], "sampling"),
        ("reference", "reference forward", med["reference_s"], "reference"),
        ("policy", "policy forward+backward", med["policy_fwd_bwd_s"], "policy"),
        ("optimizer", "optimizer step", med["optimizer_s"], "optimizer"),
    ]
    table = []
    for key, label, trainer_s, floor_key in rows:
        fl = floor_s.get(floor_key)
        table.append({"phase": key, "label": label, "trainer_s": trainer_s, "floor_s": fl,
                      "ratio": trainer_s / fl if trainer_s is not None and fl else None,
                      "floor_peak_gib": floor_peak.get(floor_key)})
    step_floor = sum(floor_s[p] for p in parts) if all_floors else None
    table.append({"phase": "step", "label": "step (all)", "trainer_s": med["step_s"],
                  "floor_s": step_floor,
                  "ratio": med["step_s"] / step_floor if step_floor else None,
                  "trainer_peak_gib": trainer_peak})
    for row in table[:2]:
        row["tokens_per_s"] = decoded_tokens / row["trainer_s"] if row["trainer_s"] else None
        row["floor_tokens_per_s"] = decoded_tokens / row["floor_s"] if row["floor_s"] else None
    return table


def _work_text(w: dict[str, Any] | None, phase: str, prompt_tokens: int = 0,
               completion_tokens: int = 0) -> str:
    """One phase's work as a line. Reference/policy: the forwards by kind (``update_forwards``):
    shared-prefix pairs as prefix + completion tokens, full forwards as rows x (P+L), and the
    tokens the same rows would take as full sequences beside the total."""
    if w is None:
        return "-"
    towers = f"tower {w['tower_images']} img in {w['tower_calls']} run(s)"
    fwd = w["lm_rows_x_tokens"]
    if phase == "generate":
        prefill = [f for f in fwd if f[1] > 1]
        steps = len(fwd) - len(prefill)
        text = " + ".join(f"{r}x{t}" for r, t in prefill) or "none"
        return f"{towers}; prefill {text}" + (f"; {steps} decode forwards" if steps else "")
    p, length = prompt_tokens, completion_tokens
    try:
        steps = update_forwards([("lm", r, t) for r, t in fwd], p, length)
    except ValueError:
        shapes = sorted({f"{r}x{t}" for r, t in fwd})
        return (f"{towers}; {len(fwd)} fwd of {' / '.join(shapes) or '-'} rows x tokens "
                f"= {w['lm_tokens']:,} LM tokens")
    shared = [s for s in steps if s[0] == "shared"]
    full = [s for s in steps if s[0] == "full"]
    parts = []
    if shared:
        pre = sum(s[1] for s in shared) * p
        comp = sum(s[2] for s in shared) * (length - 1)
        parts.append(f"{len(shared)} shared-prefix pairs (prefix {sum(s[1] for s in shared)} "
                     f"prompts x {p} = {pre:,} + completions {sum(s[2] for s in shared)} rows x "
                     f"{length - 1} = {comp:,})")
    if full:
        rows = sum(s[1] for s in full)
        parts.append(f"{len(full)} full forwards ({rows} rows x {p + length} = "
                     f"{rows * (p + length):,})")
    rows_total = sum(s[-1] for s in steps if s[0] != "tower")
    return (f"{towers}; {' + '.join(parts) or 'no forwards'} = {w['lm_tokens']:,} LM tokens "
            f"(as full sequences: {rows_total} x {p + length} = {rows_total * (p + length):,})")


def render(result: dict[str, Any]) -> str:
    def f(x: Any, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    offload = (" + optimizer offload" if result["offload_optimizer"] else "") + (
        " + parameter offload" if result["offload_params"] else "")
    title = (f"GRPO step vs floors doing the same work: {result['shape']} on {result['device']}, "
             f"ZeRO-{result['engine_zero_stage']}{offload}; {result['prompts']} prompts x G="
             f"{result['group']} = {result['rows']} rows x ({result['prompt_tokens']} prompt + "
             f"{result['completion_tokens']} completion tokens), micro-batch "
             f"{result['micro_batch']}; trainer: median of {result['steps']} steps after "
             f"{result['warmup']} warm-up; floors: median of {result['repeats']} after 1 warm-up")
    header = (f"{'phase':<42}{'trainer s':>10}{'floor s':>10}{'trainer/floor':>15}"
              f"{'tok/s':>10}{'floor tok/s':>13}{'peak GiB':>10}")
    lines = [title, "", "Time (seconds per step; peak = torch.cuda.max_memory_allocated)", header]
    for row in result["table"]:
        peak = row.get("trainer_peak_gib", row.get("floor_peak_gib"))
        lines.append(
            f"{row['label']:<42}{f(row['trainer_s'], '.3f'):>10}{f(row['floor_s'], '.3f'):>10}"
            f"{f(row['ratio'], '.2f'):>15}{f(row.get('tokens_per_s'), ',.0f'):>10}"
            f"{f(row.get('floor_tokens_per_s'), ',.0f'):>13}{f(peak, '.1f'):>10}")
    lines += ["", ("peak GiB: the trainer's step row is its peak over the timed steps; the other "
                   "rows are each floor's own peak"), "",
              "Work per step (the trainer's recorded calls; the floor's beside them)"]
    tw, fw = result["work"]["trainer"], result["work"]["floor"]
    lengths = (result["prompt_tokens"], result["completion_tokens"])
    for phase in ("generate", "reference", "policy"):
        lines.append(f"  {phase:<10} trainer: {_work_text(tw.get(phase), phase, *lengths)}")
        if phase in fw:
            same = "same" if _same_work(tw.get(phase), fw[phase], phase) else "DIFFERENT"
            lines.append(f"  {'':<10} floor:   {_work_text(fw[phase], phase, *lengths)} ({same})")
    if result["work"]["trainer"].get("generate"):
        who = "trainer and floor" if "generate" in fw else "trainer"
        lines.append(f"  {'':<10} decode: {result['rows']} rows x "
                     f"{result['completion_tokens']} tokens ({who})")
    for note in result["notes"]:
        lines.append(f"note: {note}")
    for name, err in result["floor_errors"].items():
        lines.append(f"floor {name} FAILED: {err}")
    return "\n".join(lines)


def _same_work(a: dict[str, Any] | None, b: dict[str, Any] | None,
               phase: str = "generate") -> bool:
    """Equal tower images and language-model forwards: for "generate" the prefills (the generate
    floor's decode is transformers' own loop, counted as rows x steps instead); for the update
    phases every forward, in order (a shared-prefix completion pass of L-1 = 1 token included)."""
    if a is None or b is None:
        return a is b
    def prefills(w: dict[str, Any]) -> list[list[int]]:
        if phase != "generate":
            return w["lm_rows_x_tokens"]
        return [f for f in w["lm_rows_x_tokens"] if f[1] > 1]
    return a["tower_images"] == b["tower_images"] and prefills(a) == prefills(b)


# ---------------------------------------------------------------------------------------------
# one attention implementation against another (--compare-attn)
# ---------------------------------------------------------------------------------------------


def compare_attention(shape: str, impl: str, workdir: Path, extra: list[str], *,
                      baseline: str = "sdpa",
                      load: Callable[[Path, torch.dtype, str], torch.nn.Module] | None = None
                      ) -> dict[str, Any]:
    """Our sampler (``rollout.sample``) under ``baseline`` and under ``impl`` from the same seed on
    the same 4 prompts (the bench's configuration, G samples each), and the training forward's
    log-probs (``completion_logprobs``) of what each sampled. Reported:

    - per implementation, sampler vs its own training forward: max |log-prob difference| over
      the kept tokens (a mask or cache error shows here: finding 3 of issue 16 sampled from
      empty static-cache slots under flash attention, which nothing else would show);
    - across implementations, the training forward of the baseline's samples under both: max and
      mean |log-prob difference| (kernel rounding only, in the model's dtype);
    - samples: the share of rows whose first token, and whose whole completion, agree (equal
      seeds draw equal tokens until rounding moves one draw).

    ``load(model_dir, dtype, name)`` loads the model under attention ``name`` (default
    ``load_model``; the tests pass one that installs the CPU emulation of flash attention).
    """

    from medloc import runtime
    from medloc.data.collate import append_completions, slice_batch
    from medloc.data.dataset import GroundingDataset
    from medloc.data.records import with_query
    from medloc.generation import sequence_positions
    from medloc.grpo.rollout import sample
    from medloc.models.loading import load_processor, vision_token_ids
    from medloc.models.logprobs import completion_logprobs

    model_dir, cfg = model_and_config(shape, workdir, extra)
    gc = cfg.grpo
    processor = load_processor(model_dir, min_pixels=cfg.dataset.min_pixels,
                               max_pixels=cfg.dataset.max_pixels)
    data = GroundingDataset(Path(cfg.dataset.dir) / f"{cfg.dataset.train_split}.jsonl")
    data.records = with_query(data.records, cfg.dataset.query)
    samples = [data[i] for i in range(cfg.trainer.prompts_per_step)]
    suppress = vision_token_ids(processor)
    tok = processor.tokenizer
    dtype = torch.bfloat16 if cfg.model.precision == "bf16" else torch.float32
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    g, mb = gc.num_generations, cfg.model.micro_batch_size

    def forward_logp(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        n = batch["completion_mask"].shape[0]
        with torch.no_grad():
            return torch.cat([completion_logprobs(
                model, slice_batch(batch, s, min(s + mb, n)), temperature=gc.temperature,
                suppress_token_ids=suppress).float().cpu() for s in range(0, n, mb)])  # [N, L]

    runs: dict[str, dict[str, Any]] = {}
    for name in (baseline, impl):
        model = (load or _load_attn)(model_dir, dtype, name).to(device)
        runtime.seed_step(cfg.seed, 0, 0)
        prompt_batch, gen = sample(
            model, processor, [s.image for s in samples], [s.record.query for s in samples],
            answer_format=cfg.reward.answer_format, num_generations=g,
            temperature=gc.temperature, top_p=gc.top_p, max_new_tokens=gc.max_new_tokens,
            suppress_token_ids=suppress, cache=gc.kv_cache)
        batch = append_completions(prompt_batch, gen.completion_ids, pad_id=tok.pad_token_id,
                                   eos_id=tok.eos_token_id, repeat=g)
        batch["position_ids"] = sequence_positions(gen.prompt_positions, gen.next_positions,
                                                   batch["completion_mask"], g)  # [N, 3, P+L]
        mask = batch["completion_mask"].bool()  # [N, L]
        own = forward_logp(model, batch)  # [N, L]
        runs[name] = {"model": model, "batch": batch, "mask": mask,
                      "completion_ids": gen.completion_ids, "sampler_logp": gen.logprobs,
                      "forward_logp": own}
        if name == baseline:
            model.cpu()  # room for the other implementation's copy
    base, other = runs[baseline], runs[impl]
    runs[baseline]["model"].to(device)
    cross_base = base["forward_logp"]  # [N, L]
    cross_other = forward_logp(other["model"], base["batch"])  # [N, L] same tokens, other kernels
    m = base["mask"]

    def sampler_gap(run: dict[str, Any]) -> float:
        return float((run["sampler_logp"] - run["forward_logp"]).abs()[run["mask"]].max())

    same_len = base["completion_ids"].shape == other["completion_ids"].shape
    rows_equal = (base["completion_ids"] == other["completion_ids"]).all(1) if same_len else None
    first_equal = base["completion_ids"][:, 0] == other["completion_ids"][:, 0]
    diff = (cross_base - cross_other).abs()[m]
    return {
        "shape": shape, "device": torch.cuda.get_device_name() if torch.cuda.is_available()
        else "cpu", "dtype": str(dtype), "baseline": baseline, "impl": impl,
        "rows": int(m.shape[0]), "completion_tokens": int(m.shape[1]),
        "sampler_vs_forward_max_abs": {baseline: sampler_gap(base), impl: sampler_gap(other)},
        "forward_across_impl_max_abs": float(diff.max()),
        "forward_across_impl_mean_abs": float(diff.mean()),
        "first_token_agree": float(first_equal.float().mean()),
        "completion_agree": None if rows_equal is None else float(rows_equal.float().mean()),
    }


def _load_attn(model_dir: Path, dtype: torch.dtype, name: str) -> torch.nn.Module:
    from medloc.models.loading import load_model

    return load_model(model_dir, dtype=dtype, attn_implementation=name)


def render_attention(r: dict[str, Any]) -> str:
    b, i = r["baseline"], r["impl"]
    agree = "-" if r["completion_agree"] is None else f"{r['completion_agree']:.2f}"
    gaps = r["sampler_vs_forward_max_abs"]
    lines = [
        (f"Our sampler under {b} and under {i}: {r['shape']} on {r['device']}, {r['dtype']}, "
         f"{r['rows']} rows x up to {r['completion_tokens']} tokens, same seed and prompts"),
        (f"  max |sampler log-prob - training-forward log-prob|   {b}: {gaps[b]:.3g}   "
         f"{i}: {gaps[i]:.3g}"),
        (f"  training forward of the {b} samples, {b} vs {i}: max |diff| "
         f"{r['forward_across_impl_max_abs']:.3g}, mean |diff| "
         f"{r['forward_across_impl_mean_abs']:.3g}"),
        (f"  rows whose first token agrees: {r['first_token_agree']:.2f}; whole completion: "
         f"{agree}"),
    ]
    return "\n".join(lines)


def _one_line_warnings() -> None:
    """Library warnings as one labelled line each (not the two-line default, whose second line is
    the library's source line, e.g. a stray ``warnings.warn(``)."""
    def fmt(message, category, filename, lineno, line=None):
        return f"[warning] {category.__name__}: {message} ({Path(filename).name}:{lineno})\n"

    warnings.formatwarning = fmt


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPE_NAMES), default="3b")
    ap.add_argument("--steps", type=int, default=3, help="timed trainer steps (>= 3)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed trainer steps first")
    ap.add_argument("--repeats", type=int, default=MIN_REPEATS,
                    help=f"timed runs of each floor after one warm-up (>= {MIN_REPEATS})")
    ap.add_argument("--floors", default="all",
                    help=f"which floors to run: all, none or a comma list of {','.join(FLOORS)}")
    ap.add_argument("--workdir", default=None, help="where the model and data are built "
                    "(default: a temporary folder)")
    ap.add_argument("--out", default="runs/bench/gpu_step.json")
    ap.add_argument("--compare-attn", default=None, metavar="IMPL",
                    help="instead of the step: our sampler and training forward under sdpa and "
                    "under IMPL (flash_attention_2, eager) from the same seed and prompts")
    ap.add_argument("overrides", nargs="*", help="config overrides (after --)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if args.shape != "tiny" and not torch.cuda.is_available():
        ap.error(f"--shape {args.shape} needs a CUDA GPU; --shape tiny runs on CPU")
    if args.steps < MIN_REPEATS or args.repeats < MIN_REPEATS or args.warmup < 0:
        ap.error(f"--steps and --repeats must be >= {MIN_REPEATS} (medians of at least "
                 f"{MIN_REPEATS}) and --warmup >= 0; got {args.steps}, {args.repeats}, "
                 f"{args.warmup}")
    try:
        floors = parse_floors(args.floors)
    except ValueError as err:
        ap.error(str(err))
    _one_line_warnings()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.compare_attn is not None:
        with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
            workdir = Path(args.workdir) if args.workdir else Path(tmp)
            result = compare_attention(args.shape, args.compare_attn, workdir, args.overrides)
        console(render_attention(result))
        write_json_atomic(Path(args.out), result)
        console(f"\nwritten: {args.out}")
        return 0
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        result = run(args.shape, args.steps, args.warmup, workdir, args.overrides,
                     repeats=args.repeats, floors=floors)
    console(render(result))
    write_json_atomic(Path(args.out), result)
    console(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
