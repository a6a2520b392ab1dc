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

In ``train``/``kill`` mode the evaluation after training (rank 0's) starts only once every other
rank has returned from ``medloc.train`` (OUT_DIR/returned_rank<r>, waited for up to 120 s): were
they waiting for it in a barrier, the run fails. It also checks that no training ``Engine`` is
alive then (weak references).

With ``MEDLOC_TEST_NCCL_RULE=1`` every mode runs under the tests' NCCL rule
(tests/distributed/nccl_rule.py), installed before anything starts the process group; each rank
writes the counts of the collectives that passed it to OUT_DIR/nccl_rule_rank<r>.json at exit.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import runpy
import sys
import time
import weakref
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
    _evaluation_waits_for_the_other_ranks(out)
    # Exactly `python -m medloc.train OVERRIDES` (its __main__ block adds the rank > 0 overrides;
    # Hydra resolves conf/ relative to medloc/train.py only when it runs as __main__).
    sys.argv = [str(REPO / "medloc" / "train.py"), *overrides]
    runpy.run_module("medloc.train", run_name="__main__", alter_sys=True)
    (out / f"returned_rank{os.environ.get('RANK', '0')}").write_text("")


def _evaluation_waits_for_the_other_ranks(out: Path, timeout_s: float = 120.0) -> None:
    """Rank 0's evaluation starts once the other ranks have returned from medloc.train and no
    training engine is alive (see the module docstring)."""
    from medloc import engine as eng
    from medloc import evaluation

    engines: list[weakref.ref] = []
    engine_init = eng.Engine.__init__

    def recording_init(self, spec):
        engine_init(self, spec)
        engines.append(weakref.ref(self))

    eng.Engine.__init__ = recording_init
    evaluate = evaluation.evaluate_checkpoint
    world = int(os.environ.get("WORLD_SIZE", "1"))

    def waiting_evaluate(**kwargs):
        deadline = time.monotonic() + timeout_s
        others = [out / f"returned_rank{r}" for r in range(1, world)]
        while not all(p.exists() for p in others):
            if time.monotonic() > deadline:
                raise RuntimeError(f"evaluation: ranks 1..{world - 1} did not return within "
                                   f"{timeout_s:.0f} s (still waiting in a collective?)")
            time.sleep(0.2)
        gc.collect()
        alive = sum(r() is not None for r in engines)
        if not engines or alive:
            raise RuntimeError(f"evaluation: {alive} of {len(engines)} training engines alive")
        (out / "evaluation_started_after_peers").write_text(json.dumps({"world": world}))
        return evaluate(**kwargs)

    evaluation.evaluate_checkpoint = waiting_evaluate


def _install_nccl_rule(out: Path) -> None:
    from nccl_rule import ENV, NcclRule

    if os.environ.get(ENV) != "1":
        return
    from medloc import engine as eng

    rule = NcclRule().install(eng)
    out.mkdir(parents=True, exist_ok=True)
    atexit.register(lambda: rule.write(out / f"nccl_rule_rank{os.environ.get('RANK', '0')}.json"))


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _install_nccl_rule(Path(rest[1] if mode in ("update", "kill") else rest[0]))
    if mode == "update":
        update(rest[0], rest[1], rest[2:])
    elif mode == "train":
        train(rest[0], rest[1:])
    elif mode == "kill":
        train(rest[1], rest[2:], kill_at=int(rest[0]))
    else:
        raise SystemExit(f"unknown mode {mode!r}: expected update, train or kill")
