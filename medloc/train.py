"""Hydra entry point: ``python -m medloc.train [overrides]``.

    python -m medloc.train debug=cpu_tiny                       # seconds per step on CPU
    torchrun --nproc_per_node=2 -m medloc.train engine=zero3 debug=cpu_tiny
    python -m medloc.train dataset=ham10000 model=qwen2_5_vl_3b curriculum=medloc seed=1 \
        data_root=/data/medloc MODEL_DIR=/data/models hydra.run.dir=runs/ham_medloc_s1

Builds the objects the config names, runs the method (grpo, sft or zero_shot), then evaluates the
final policy on the eval split. Every rank runs this; only rank 0 writes files. The run directory
is the one Hydra chose on rank 0 (``hydra.run.dir``), shared with every rank.

A run directory that already holds results is checked at start against the configuration that made
them (its ``resolved_config.json``; ``medloc.runtime.plan_run_folder`` has the rules):

- same configuration, finished (evaluated)    -> ``[skip]``, nothing runs (a sweep continues);
- same configuration, ``trainer.resume=true`` -> continue from the newest checkpoint;
- only ``trainer.max_steps`` differs, ``trainer.resume=true`` -> continue to the new length and
  evaluate again (exactly the straight run of that length, except for progress-based curricula,
  which stop: their τ depends on t/max_steps);
- any other difference -> stop at once, naming each key with its stored and new value;
- ``force=true`` -> delete the folder's results and run from step 0.

Keys that may differ without counting (logger, checkpoint cadence, trainer.resume, ...):
``medloc.runtime.MAY_DIFFER``, each with its reason.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from medloc import runtime
from medloc.atomic import write_json_atomic
from medloc.config import RunConfig, register_configs, to_run_config
from medloc.logging import console

register_configs()


def progress_schedule(cfg: RunConfig) -> bool:
    """Whether the run's τ depends on t / trainer.max_steps (V-Triune, the fixed presets)."""
    if cfg.method != "grpo":
        return False
    from medloc.curriculum import build_scheduler
    from medloc.curriculum.progress import ProgressScheduler

    sched = build_scheduler(cfg.curriculum, total_steps=max(1, cfg.trainer.max_steps))
    return isinstance(sched, ProgressScheduler)


def run(cfg: RunConfig, run_dir: Path) -> Path:
    """Train (or not) and evaluate; returns the run directory."""
    from medloc.models.loading import resolve_model_path
    from medloc.prepare import ensure_model, require_dataset

    # Inputs first (every rank; builds are file-locked): a missing model, init_from folder or
    # dataset fails at once with its how-to message, not after the DeepSpeed start-up. A phantom
    # dataset was built before the job started (conf/config.yaml: data_prep's Hydra callback).
    model_path = ensure_model(cfg.model)
    require_dataset(cfg.dataset)
    if cfg.init_from:
        resolve_model_path(cfg.init_from)
    start = cfg.init_from or model_path

    from medloc import engine as eng

    rank, _ = eng.init_distributed()
    run_dir = Path(eng.broadcast_object(str(run_dir)))
    resolved = dataclasses.asdict(cfg)  # = the Hydra config, resolved (every key is in the schema)
    plan: runtime.FolderPlan | Exception | None = None
    if rank == 0:
        try:
            plan = runtime.plan_run_folder(run_dir, resolved, progress_schedule=progress_schedule(cfg))
        except runtime.RunFolderConflict as err:
            plan = err
    plan = eng.broadcast_object(plan)
    if isinstance(plan, Exception):
        raise plan  # on every rank: the run stops before the folder is touched
    if rank == 0 and plan.note:
        console(plan.note)
    if plan.action == "skip":
        return run_dir
    if rank == 0:
        runtime.remove_results(run_dir, plan.remove)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "run_info.json", {
            "dataset": cfg.dataset.name, "arm": cfg.arm, "method": cfg.method, "seed": cfg.seed,
            "model": cfg.model.name, "experiment": cfg.experiment, "init_from": start,
            "max_steps": cfg.trainer.max_steps,
        })
        write_json_atomic(run_dir / runtime.CONFIG_FILE, resolved)
    eng.barrier()

    final = train_and_release(cfg, run_dir, start)
    # Evaluation is rank 0's alone, after every rank has released its training engine: one model
    # in eval mode over the whole eval split, as in a one-GPU run (the same scores at any world
    # size). The other ranks return now (the final folder is complete: fit's last barrier) rather
    # than wait in a barrier that the process group's timeout (30 min) would end while rank 0
    # evaluates; nothing after this point is collective.
    if cfg.trainer.eval_after and rank == 0:
        from medloc.evaluation import evaluate_checkpoint

        evaluate_checkpoint(
            checkpoint=str(final), dataset=cfg.dataset, eval_cfg=cfg.eval,
            answer_format=cfg.reward.answer_format, parse_rule=cfg.reward.parse_rule,
            out_dir=run_dir / "eval",
        )
    return run_dir


def train_and_release(cfg: RunConfig, run_dir: Path, start: str) -> Path:
    """Run ``cfg.method`` from ``start`` and return the final Hugging Face folder (zero_shot:
    ``start`` itself). The trainer and its engine (policy, optimizer, reference, DeepSpeed's hooks)
    are released on every rank before this returns, and their memory freed, so the evaluation
    model is the only one left."""
    if cfg.method == "zero_shot":
        return Path(start)
    if cfg.method == "grpo":
        from medloc.grpo.trainer import GRPOTrainer

        trainer = GRPOTrainer(cfg, run_dir, start)
    elif cfg.method == "sft":
        from medloc.sft import SFTTrainer

        trainer = SFTTrainer(cfg, run_dir, start)
    else:
        raise ValueError(f"method={cfg.method!r}: expected grpo, sft or zero_shot")
    try:
        return trainer.fit()
    finally:
        trainer.close()
        del trainer
        from medloc import engine as eng

        eng.release_memory()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from medloc.cli_errors import exit_on_config_error

    with exit_on_config_error():  # a value the schema rejects: one message, exit 2
        run_cfg = to_run_config(cfg)
    run(run_cfg, Path(HydraConfig.get().runtime.output_dir))


def _non_zero_rank_overrides(argv: list[str]) -> list[str]:
    """Ranks > 0 must not create Hydra folders of their own: rank 0's run dir is broadcast."""
    if int(os.environ.get("RANK", "0")) == 0:
        return argv
    extra = ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    if not any(a.startswith("hydra.run.dir=") for a in argv):
        extra.append(f"hydra.run.dir={tempfile.mkdtemp(prefix='medloc_rank_')}")
    return argv + extra


if __name__ == "__main__":
    from medloc.cli_errors import run_hydra_main

    sys.argv = [sys.argv[0], *_non_zero_rank_overrides(sys.argv[1:])]
    run_hydra_main(main)  # configuration errors: one message, exit 2 (HYDRA_FULL_ERROR=1: traceback)
