"""`make bench-gpu`: one GRPO step of the trainer against the sum of its standalone parts.

    python -m experiments.bench_gpu                  # random-weight Qwen2.5-VL-3B shape, one GPU
    python -m experiments.bench_gpu --shape 7b       # the 7B shape
    python -m experiments.bench_gpu --shape tiny     # the embedded tiny model on CPU (< 1 min)
    python -m experiments.bench_gpu -- engine=zero3  # any config override after --

The reference configuration (issue 9; ../shared/gpu/README.md): 4 prompts x G=8, phantom HAM10000
images at 600x450 (588x448 for the model: 336 image tokens), 128 new tokens forced (a random model
never stops; EOS is banned until then, as ``make bench`` does), micro-batch 8, gradient
checkpointing on, bf16, sdpa, ``engine=auto``, no checkpoints, no evaluation. ``--shape tiny`` runs
the same on the tiny model (fp32, CPU, 112x112 images, 24 new tokens, ZeRO-0).

In ONE process, on the same model object: first ``--warmup`` + ``--steps`` trainer steps
(``GRPOTrainer.train_step``, each phase timed after a device synchronisation), then the floors:

- generate: transformers' ``generate`` with ``cache_implementation="static"`` on the last step's
  rows (B*G repeated prompts, same sampling settings, same forced length);
- reference forward: a no-grad forward of the reference over the same prompt+completion rows, in
  the same micro-batches;
- policy forward+backward: plain torch (``model(...).logits`` -> log-softmax of the completion
  tokens -> ``backward``), train mode, same micro-batches, no DeepSpeed;
- optimizer step: ``torch.optim.AdamW`` (fused on GPU) over a 1/8 slice of the trainable
  parameter count, in fp32, times 8 (AdamW is memory-bound and linear in the element count; a
  full copy of the optimizer state would not fit beside the trainer's).

It prints one table (phase, trainer median, floor, ratio, tokens/s, peak memory) and writes it as
JSON to ``--out`` (default ``runs/bench/gpu_step.json``, written atomically). Nothing is asserted:
the numbers are for reading (a test runs ``--shape tiny`` so the script cannot rot).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from medloc.atomic import write_json_atomic
from medloc.logging import console

CONF = Path(__file__).resolve().parents[1] / "conf"
SHAPE_NAMES = {"3b": "qwen2.5-vl-3b", "7b": "qwen2.5-vl-7b", "tiny": "tiny-1m"}


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


def _sync() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def _median_time(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = _sync()
        fn()
        times.append(_sync() - t0)
    return statistics.median(times)


def build_model(shape: str, model_dir: Path) -> Path:
    if shape == "tiny":
        from medloc.models.tiny import build_tiny_model

        return build_tiny_model(model_dir, size="tiny-1m", seed=0)
    from medloc.models.shapes import build_random_shape

    return build_random_shape(model_dir, shape=SHAPE_NAMES[shape])


def run(shape: str, steps: int, warmup: int, workdir: Path, extra: list[str]) -> dict[str, Any]:
    from hydra import compose, initialize_config_dir

    from data_prep.build import ensure_dataset
    from medloc import generation, runtime
    from medloc.config import register_configs, to_run_config
    from medloc.data.collate import model_inputs, repeat_prompts, slice_batch
    from medloc.grpo import rollout as rollout_module
    from medloc.grpo.loss import selective_log_softmax
    from medloc.grpo.trainer import GRPOTrainer

    model_dir = build_model(shape, workdir / "model")
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = to_run_config(compose(config_name="config",
                                    overrides=[*overrides_for(shape, model_dir, workdir), *extra]))
    ensure_dataset(cfg.dataset)
    gc = cfg.grpo
    g, new_tokens, mb = gc.num_generations, gc.max_new_tokens, cfg.model.micro_batch_size

    # Equal work every step: EOS banned until max_new_tokens (a random model rarely stops anyway).
    captured: dict[str, Any] = {}
    real_generate = generation.generate

    def forced_generate(model, prompt_batch, **kw):
        captured["prompt_batch"] = prompt_batch
        return real_generate(model, prompt_batch, **{**kw, "min_new_tokens": kw["max_new_tokens"]})

    rollout_module.generate = forced_generate
    real_rollout = rollout_module.rollout

    def capturing_rollout(*args, **kw):
        captured["rollout"] = ro = real_rollout(*args, **kw)
        return ro

    trainer_module = sys.modules[GRPOTrainer.__module__]
    trainer_module.rollout = capturing_rollout
    try:
        trainer = GRPOTrainer(cfg, workdir / "run", str(model_dir))
        rows = []
        for step in range(warmup + steps):
            runtime.seed_step(cfg.seed, step, 0)
            _reset_peak()
            t0 = _sync()
            m = trainer.train_step(step)
            wall = _sync() - t0
            if step >= warmup:
                rows.append({"step_s": wall, "generate_s": m["time/generate_s"],
                             "reference_s": m.get("time/reference_s", 0.0),
                             "policy_s": m.get("time/policy_s", 0.0), "peak_gib": _peak_gib(),
                             "generate_tokens_per_s": m["time/generate_tokens_per_s"]})
    finally:
        rollout_module.generate = real_generate
        trainer_module.rollout = real_rollout

    med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if rows[0][k] is not None}
    peak_trainer = max((r["peak_gib"] for r in rows if r["peak_gib"] is not None), default=None)

    # ---- floors, same process, same model objects, the last step's rows
    ro, prompt_batch = captured["rollout"], captured["prompt_batch"]
    batch = ro.batch
    n, length = batch["completion_mask"].shape
    model = trainer.engine.module
    device = next(model.parameters()).device
    tok = trainer.processor.tokenizer
    floors: dict[str, float] = {}
    peaks: dict[str, float | None] = {}

    model.eval()
    inputs = {k: v.to(device) for k, v in model_inputs(repeat_prompts(prompt_batch, g)).items()}

    def hf_generate():
        with torch.no_grad():
            model.generate(**inputs, do_sample=True, temperature=gc.temperature, top_p=gc.top_p,
                           top_k=0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           cache_implementation="static", eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id, use_cache=True)

    _reset_peak()
    floors["generate"] = _median_time(hf_generate, 2)
    peaks["generate"] = _peak_gib()

    bounds = [(s, min(s + mb, n)) for s in range(0, n, mb)]
    reference = trainer.engine.reference

    def reference_forward():
        with torch.no_grad():
            for s, e in bounds:
                part = {k: v.to(device) for k, v in model_inputs(slice_batch(batch, s, e)).items()}
                reference(**part, logits_to_keep=length + 1, use_cache=False)

    if reference is not None:
        _reset_peak()
        floors["reference"] = _median_time(reference_forward, 2)
        peaks["reference"] = _peak_gib()

    model.train()

    def forward_backward():
        for s, e in bounds:
            part = slice_batch(batch, s, e)
            ids = part["input_ids"][:, -length:].to(device)
            logits = model(**{k: v.to(device) for k, v in model_inputs(part).items()},
                           logits_to_keep=length + 1, use_cache=False).logits[:, :-1]
            selective_log_softmax(logits, ids).mean().backward()
        for p in model.parameters():
            p.grad = None

    _reset_peak()
    floors["policy_fwd_bwd"] = _median_time(forward_backward, 2)
    peaks["policy_fwd_bwd"] = _peak_gib()

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    part_numel = max(1, trainable // 8)
    flat = torch.zeros(part_numel, dtype=torch.float32, device=device, requires_grad=True)
    flat.grad = torch.randn_like(flat)
    opt = torch.optim.AdamW([flat], lr=1e-6, fused=torch.cuda.is_available())
    opt.step()  # allocate the state
    floors["optimizer"] = 8 * _median_time(opt.step, 3)
    del opt, flat

    tokens_generated = n * length
    floor_update = floors.get("reference", 0.0) + floors["policy_fwd_bwd"] + floors["optimizer"]
    table = [
        {"phase": "generate", "trainer_s": med["generate_s"], "floor_s": floors["generate"],
         "tokens_per_s": med["generate_tokens_per_s"],
         "floor_tokens_per_s": tokens_generated / floors["generate"],
         "peak_gib": peaks["generate"]},
        {"phase": "reference forward", "trainer_s": med["reference_s"],
         "floor_s": floors.get("reference", 0.0), "peak_gib": peaks.get("reference")},
        {"phase": "policy fwd+bwd+optimizer", "trainer_s": med["policy_s"],
         "floor_s": floors["policy_fwd_bwd"] + floors["optimizer"],
         "peak_gib": peaks["policy_fwd_bwd"]},
        {"phase": "step (all)", "trainer_s": med["step_s"],
         "floor_s": floors["generate"] + floor_update, "peak_gib": peak_trainer},
    ]
    for row in table:
        row["ratio"] = row["trainer_s"] / row["floor_s"] if row["floor_s"] > 0 else None
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {
        "shape": shape, "device": device_name, "engine_zero_stage": trainer.engine.spec.zero_stage,
        "offload_optimizer": trainer.engine.spec.offload_optimizer,
        "rows": n, "prompt_tokens": int(batch["input_ids"].shape[1] - length),
        "completion_tokens": length, "micro_batch": mb, "steps": steps, "warmup": warmup,
        "trainable_params": trainable, "floors_s": floors, "per_step": rows, "table": table,
    }


def render(result: dict[str, Any]) -> str:
    def f(x: Any, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    offload = " + optimizer offload" if result["offload_optimizer"] else ""
    title = (f"GRPO step vs its parts: {result['shape']} on {result['device']}, ZeRO-"
             f"{result['engine_zero_stage']}{offload}, {result['rows']} rows x "
             f"({result['prompt_tokens']} prompt + {result['completion_tokens']} completion "
             f"tokens), micro-batch {result['micro_batch']}, median of {result['steps']} steps "
             f"after {result['warmup']} warm-up")
    header = (f"{'phase':<26}{'trainer s':>10}{'floor s':>10}{'ratio':>8}{'tok/s':>10}"
              f"{'floor tok/s':>13}{'peak GiB':>10}")
    lines = [title, "", header]
    for row in result["table"]:
        lines.append(
            f"{row['phase']:<26}{row['trainer_s']:>10.3f}{row['floor_s']:>10.3f}"
            f"{f(row['ratio'], '.2f'):>8}{f(row.get('tokens_per_s'), ',.0f'):>10}"
            f"{f(row.get('floor_tokens_per_s'), ',.0f'):>13}{f(row['peak_gib'], '.1f'):>10}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPE_NAMES), default="3b")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="where the model and data are built "
                    "(default: a temporary folder)")
    ap.add_argument("--out", default="runs/bench/gpu_step.json")
    ap.add_argument("overrides", nargs="*", help="config overrides (after --)")
    args = ap.parse_args(argv)
    if args.shape != "tiny" and not torch.cuda.is_available():
        ap.error(f"--shape {args.shape} needs a CUDA GPU; --shape tiny runs on CPU")
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        result = run(args.shape, args.steps, args.warmup, workdir, args.overrides)
    console(render(result))
    write_json_atomic(Path(args.out), result)
    console(f"\nwritten: {args.out}")
    console(json.dumps({r["phase"]: r["ratio"] for r in result["table"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
