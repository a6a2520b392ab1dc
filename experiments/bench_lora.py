"""Peak memory of GRPO steps with ``peft=lora`` against full fine-tuning, both with a reference
(beta > 0), each arm in its own process so that the peaks do not mix.

    python -m experiments.bench_lora                        # tiny-4m, ZeRO-0, 2 steps per arm
    python -m experiments.bench_lora --model tiny_4m --engine zero0 --steps 2 --out bench_lora.json
    python -m experiments.bench_lora --override peft.r=8     # any Hydra override, both arms

An arm builds the GRPO trainer of ``debug=cpu_tiny`` with ``model=<--model>`` (building the tiny
model and the phantom data when they are missing), runs ``--steps`` training steps (rollout,
reference forward, update) and reports:

- ``rss_setup_mib``: the process's peak resident memory once the trainer is built (model(s),
  optimizer, processor; what the OS saw, ``ru_maxrss``),
- ``rss_peak_mib``: the peak after the steps,
- ``cuda_peak_mib`` (on a GPU): ``torch.cuda.max_memory_allocated`` over setup and steps,
- the parameter counts (all, trainable) and whether a second model was loaded as the reference.

Full fine-tuning holds the policy, its gradients and Adam moments for every parameter, and a
second copy of the weights as the reference; LoRA holds the frozen base once, the adapters with
their gradients and moments, and no second copy. Nothing here asserts: the numbers are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ARMS = {"full": ["peft=none"], "lora": ["peft=lora"]}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_arm(arm: str, *, model: str, engine: str, steps: int, out: Path,
            overrides: list[str]) -> None:
    """One arm in this process (called in a child): build, step, write the measurements."""
    import torch

    from data_prep.build import ensure_dataset
    from medloc import runtime
    from medloc.engine_plan import compose_run_config
    from medloc.grpo.trainer import GRPOTrainer
    from medloc.prepare import ensure_model

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = compose_run_config(["debug=cpu_tiny", f"model={model}", f"engine={engine}",
                              "logger.progress=false", *ARMS[arm], *overrides])
    if cfg.grpo.beta <= 0:
        raise ValueError(f"grpo.beta={cfg.grpo.beta}: the comparison needs a reference (beta > 0)")
    ensure_dataset(cfg.dataset)
    model_path = ensure_model(cfg.model)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = GRPOTrainer(cfg, Path(run_dir), str(model_path))
        setup = _rss_mib()
        module = trainer.engine.module
        counts = {"params": sum(p.numel() for p in module.parameters()),
                  "trainable": sum(p.numel() for p in module.parameters() if p.requires_grad)}
        reference = trainer.engine.reference
        own = {id(p) for p in module.parameters()}
        second_model = reference is not None and bool({id(p) for p in reference.parameters()} - own)
        rewards = []
        for step in range(steps):
            runtime.seed_step(cfg.seed, step, trainer.rank)
            rewards.append(trainer.train_step(step)["reward/mean"])
        result = {
            "arm": arm, "model": model, "engine": engine, "steps": steps, "beta": cfg.grpo.beta,
            **counts, "reference_is_a_second_model": bool(second_model),
            "rss_setup_mib": round(setup, 1), "rss_peak_mib": round(_rss_mib(), 1),
            "reward_mean": rewards,
        }
        if torch.cuda.is_available():
            result["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        trainer.close()
    out.write_text(json.dumps(result))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.bench_lora",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny_4m", help="a conf/model/ option (default tiny_4m)")
    ap.add_argument("--engine", default="zero0", help="a conf/engine/ option (default zero0)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="a Hydra override for both arms, e.g. --override peft.r=8")
    ap.add_argument("--child", nargs=2, metavar=("ARM", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        run_arm(args.child[0], model=args.model, engine=args.engine, steps=args.steps,
                out=Path(args.child[1]), overrides=args.override)
        return 0
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for arm in ARMS:
            out = Path(tmp) / f"{arm}.json"
            env = {k: v for k, v in os.environ.items()
                   if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
            env.setdefault("OMP_NUM_THREADS", "1")
            cmd = [sys.executable, "-m", "experiments.bench_lora", "--model", args.model,
                   "--engine", args.engine, "--steps", str(args.steps), "--child", arm, str(out),
                   *(f"--override={o}" for o in args.override)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                print(proc.stdout[-3000:], proc.stderr[-5000:], file=sys.stderr)
                return proc.returncode
            results.append(json.loads(out.read_text()))
    cols = ["arm", "params", "trainable", "reference_is_a_second_model", "rss_setup_mib",
            "rss_peak_mib", *(["cuda_peak_mib"] if "cuda_peak_mib" in results[0] else [])]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in results:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    full, lora = results
    print(f"LoRA / full peak RSS: {lora['rss_peak_mib'] / full['rss_peak_mib']:.3f} "
          f"({full['rss_peak_mib'] - lora['rss_peak_mib']:+.1f} MiB saved)")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
