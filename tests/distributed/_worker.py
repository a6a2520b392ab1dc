"""Worker launched by ``torchrun`` from tests/distributed/test_zero3.py (not a test module).

    torchrun --nproc_per_node=N tests/distributed/_worker.py update BATCH.pt OUT_DIR [overrides]
        Build a GRPOTrainer from the Hydra config (conf/ + overrides), take this rank's share of
        the saved rollout batch (whole groups: rows rank*N/W .. (rank+1)*N/W), run ONE
        ``GRPOTrainer.update`` with the saved advantages, and write the updated policy as a
        Hugging Face folder OUT_DIR/after (gathered from the ZeRO-3 partitions) and rank 0's
        update metrics to OUT_DIR/metrics.json.

    torchrun --nproc_per_node=N tests/distributed/_worker.py train OUT_DIR [overrides]
        Run ``python -m medloc.train OVERRIDES`` itself (through runpy, so its __main__ block and
        Hydra main run unchanged), with one observation hook: after every GRPO step, each rank
        appends its scheduler's threshold and full state to OUT_DIR/tau_rank<r>.jsonl.

    torchrun --nproc_per_node=N tests/distributed/_worker.py kill STEP OUT_DIR [overrides]
        As ``train``, but every rank dies at once (``os._exit(KILLED)``: no cleanup, no flush) when
        it is about to write the checkpoint of step STEP -- a run killed between two checkpoints.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch

torch.set_num_threads(1)

KILLED = 57  # the exit code of the ``kill`` mode


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from medloc.config import register_configs, to_run_config

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return to_run_config(compose(config_name="config", overrides=overrides))


def update(batch_path: str, out_dir: str, overrides: list[str]) -> None:
    from medloc.data.collate import slice_batch
    from medloc.grpo.trainer import GRPOTrainer

    out = Path(out_dir)
    cfg = _compose(overrides)
    trainer = GRPOTrainer(cfg, out / "run", cfg.model.path)
    saved = torch.load(batch_path, weights_only=True)
    batch, adv = saved["batch"], saved["adv"]  # [N, ...], [N]
    n = adv.shape[0]
    per = n // trainer.world
    lo, hi = trainer.rank * per, (trainer.rank + 1) * per
    metrics = trainer.update(slice_batch(batch, lo, hi), adv[lo:hi], dead=0.0)
    trainer.engine.save_hf(out / "after")  # collective: gathers ZeRO-3 partitions, rank 0 writes
    if trainer.rank == 0:
        metrics["world_size"] = trainer.world
        metrics["micro_steps"] = trainer.micro_steps
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))


def train(out_dir: str, overrides: list[str], kill_at: int | None = None) -> None:
    from medloc.base_trainer import BaseTrainer
    from medloc.grpo.trainer import GRPOTrainer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    original = GRPOTrainer.train_step

    def observed(self, step: int) -> dict[str, float]:
        metrics = original(self, step)
        row = {"step": step, "tau_used": metrics.get("curriculum/tau"), "tau_next": self.scheduler.tau,
               "state": self.scheduler.state_dict()}
        with open(out / f"tau_rank{self.rank}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        return metrics

    GRPOTrainer.train_step = observed
    if kill_at is not None:
        save = BaseTrainer.save_checkpoint

        def save_or_die(self) -> None:
            if self.step == kill_at:
                os._exit(KILLED)
            save(self)

        BaseTrainer.save_checkpoint = save_or_die
    # Exactly `python -m medloc.train OVERRIDES` (its __main__ block adds the rank > 0 overrides;
    # Hydra resolves conf/ relative to medloc/train.py only when it runs as __main__).
    sys.argv = [str(REPO / "medloc" / "train.py"), *overrides]
    runpy.run_module("medloc.train", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if mode == "update":
        update(rest[0], rest[1], rest[2:])
    elif mode == "train":
        train(rest[0], rest[1:])
    elif mode == "kill":
        train(rest[1], rest[2:], kill_at=int(rest[0]))
    else:
        raise SystemExit(f"unknown mode {mode!r}: expected update, train or kill")
