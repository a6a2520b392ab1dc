"""What the GRPO and SFT trainers share: the engine, the data of each step, checkpoints, exact
resume, logging, and the step loop (``fit``). A subclass supplies ``train_step`` and its extra
checkpoint state; see ``medloc.grpo.trainer.GRPOTrainer`` and ``medloc.sft.SFTTrainer``.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medloc import engine as eng
from medloc import engine_plan, runtime
from medloc.atomic import atomic_directory_swap, write_json_atomic
from medloc.config import RunConfig, run_label
from medloc.data.dataset import GroundingDataset, ImageLoadError
from medloc.data.records import with_query
from medloc.logging import MetricsLogger, console
from medloc.models.loading import load_processor
from medloc.models.lora import LoraSpec


class TrainingStopped(RuntimeError):
    """Raised when the run cannot go on (e.g. too many non-finite losses in a row)."""


def zero_decision(cfg: RunConfig, model_path: str, *, world_size: int, with_reference: bool
                  ) -> engine_plan.ZeroDecision:
    """The ZeRO stage of this run: as configured, or chosen by the rule (engine.zero_stage=auto)."""
    return engine_plan.decide(
        zero_stage=cfg.engine.zero_stage, offload_optimizer=cfg.engine.offload_optimizer,
        offload_params=cfg.engine.offload_params, precision=cfg.model.precision,
        model_path=model_path, world_size=world_size,
        workload=engine_plan.workload_from_config(cfg, with_reference=with_reference),
        reserve_gib=cfg.engine.auto_reserve_gib,
        host_reserve_gib=cfg.engine.auto_host_reserve_gib_per_rank,
    )


def engine_spec(cfg: RunConfig, model_path: str, *, micro_steps: int, with_reference: bool,
                plan: engine_plan.ZeroPlan) -> eng.EngineSpec:
    return eng.EngineSpec(
        model_path=model_path,
        zero_stage=plan.stage,
        precision=cfg.model.precision,
        offload_optimizer=plan.offload_optimizer,
        offload_params=plan.offload_params,
        attn_implementation=cfg.model.attn_implementation,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        freeze_vision=cfg.model.freeze_vision,
        lr=cfg.peft.lr if cfg.peft.kind == "lora" and cfg.peft.lr is not None else cfg.optim.lr,
        betas=(cfg.optim.betas[0], cfg.optim.betas[1]),
        weight_decay=cfg.optim.weight_decay,
        warmup_steps=cfg.optim.warmup_steps,
        grad_clip=cfg.optim.grad_clip,
        micro_batch_size=cfg.model.micro_batch_size,
        grad_accum_steps=micro_steps,
        with_reference=with_reference,
        lora=lora_spec(cfg),
    )


def lora_spec(cfg: RunConfig) -> LoraSpec | None:
    """The LoRA adapters of ``peft=lora`` (initialised from the run's seed); None for ``peft=none``."""
    p = cfg.peft
    if p.kind == "none":
        return None
    if p.kind == "lora":
        return LoraSpec(r=p.r, alpha=p.alpha, dropout=p.dropout, target_modules=list(p.target_modules),
                        include_vision=p.include_vision, seed=cfg.seed)
    raise ValueError(f"peft.kind={p.kind!r}: expected none or lora")


class BaseTrainer:
    """What GRPO and SFT share: data, engine, checkpoints, resume, logging."""

    method = "base"

    def __init__(self, cfg: RunConfig, run_dir: Path, model_path: str, samples_per_step: int,
                 rows_per_step: int, with_reference: bool):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.rank, self.world = eng.init_distributed()
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)  # metrics.jsonl is appended there
        if samples_per_step % self.world:
            raise ValueError(
                f"{samples_per_step} prompts per step cannot be split over {self.world} processes"
            )
        self.samples_per_step = samples_per_step
        self.local_rows = rows_per_step // self.world
        mb = cfg.model.micro_batch_size
        self.micro_steps = max(1, math.ceil(self.local_rows / mb))
        # Rank 0 decides (its GPU), every rank uses the same stage; one line and run_info.json.
        self.zero = eng.broadcast_object(
            zero_decision(cfg, model_path, world_size=self.world, with_reference=with_reference)
            if self.rank == 0 else None)
        if self.rank == 0:
            console(self.zero.line())
            engine_plan.record(self.run_dir, self.zero)
        self.engine = eng.Engine(
            engine_spec(cfg, model_path, micro_steps=self.micro_steps,
                        with_reference=with_reference, plan=self.zero.plan)
        )
        self.processor = load_processor(
            model_path, min_pixels=cfg.dataset.min_pixels, max_pixels=cfg.dataset.max_pixels
        )
        self.data = GroundingDataset(Path(cfg.dataset.dir) / f"{cfg.dataset.train_split}.jsonl")
        self.data.records = with_query(self.data.records, cfg.dataset.query)
        if cfg.dataset.max_train_samples is not None:
            self.data.records = self.data.records[: cfg.dataset.max_train_samples]
        self.step = 0
        self.skipped_images = 0
        self.bad_steps_in_row = 0
        self.nonfinite_total = 0
        self.logger = self.make_logger()  # rank 0 writes; other ranks get a no-op logger

    # -- data -----------------------------------------------------------------------------------

    def load_step_samples(self, step: int) -> tuple[list[Any], list[Any], list[str]]:
        """This rank's (records, images) for ``step``. An unreadable image is skipped, counted and
        named; the next index of the permutation takes its place so every rank keeps its share."""
        n = len(self.data)
        global_idx = runtime.step_indices(n, step, self.samples_per_step, self.cfg.seed)
        mine = runtime.rank_slice(global_idx, self.rank, self.world)
        records, images, problems = [], [], []
        fallback = iter(np.random.default_rng([self.cfg.seed, step, self.rank, 7]).permutation(n))
        for idx in mine:
            while True:
                try:
                    sample = self.data[idx]
                    records.append(sample.record)
                    images.append(sample.image)
                    break
                except (ImageLoadError, OSError) as err:
                    self.skipped_images += 1
                    problems.append(f"{self.data.image_path(idx)}: {err}")
                    idx = int(next(fallback))
        return records, images, problems

    # -- checkpoints ----------------------------------------------------------------------------

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def save_checkpoint(self) -> None:
        final = runtime.checkpoint_dir(self.run_dir, self.step)
        tmp = final.with_name(final.name + ".tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        eng.barrier()
        self.engine.save_engine_state(tmp, client_state={"step": self.step})
        if self.engine.lora is not None:  # LoRA: the adapter alone (the base is the model folder)
            self.engine.save_adapter(tmp / "adapter")
        else:
            self.engine.save_hf(tmp / "hf", self.processor)
        eng.barrier()
        if self.rank == 0:
            state = {
                "step": self.step,
                "method": self.method,
                "skipped_images": self.skipped_images,
                "nonfinite_total": self.nonfinite_total,
                **self.extra_state(),
            }
            write_json_atomic(tmp / "trainer_state.json", state)
            atomic_directory_swap(tmp, final)
            runtime.prune_checkpoints(self.run_dir, self.cfg.trainer.keep_last)
        eng.barrier()

    def maybe_resume(self) -> None:
        """With ``trainer.resume=true``, restore the newest complete checkpoint (weights, optimizer
        and lr-schedule state, step, counters, the subclass's state). Then, resumed or not, rank 0
        drops the log rows of the steps this process is about to run (left by a cut run or an
        earlier attempt), so every step has one row. What to do with the folder as a whole (skip,
        start over, stop on another configuration) was decided before: runtime.plan_run_folder."""
        folder = None
        if self.cfg.trainer.resume:
            found = latest_checkpoint_everywhere(self.run_dir)
            if found is not None:
                step, folder = found
                if step > self.cfg.trainer.max_steps:
                    raise runtime.RunFolderConflict(
                        f"newest checkpoint {folder} is at step {step}, past trainer.max_steps="
                        f"{self.cfg.trainer.max_steps}: a resumed run cannot go back")
                state = json.loads((folder / "trainer_state.json").read_text())
                self.engine.load_engine_state(folder)
                self.step = int(state["step"])
                self.skipped_images = int(state.get("skipped_images", 0))
                self.nonfinite_total = int(state.get("nonfinite_total", 0))
                self.load_extra_state(state)
        if self.rank == 0:
            for name in ("metrics.jsonl", "samples.jsonl", "ious.jsonl"):
                runtime.truncate_jsonl(self.run_dir / name, self.step - 1)
            if folder is not None:
                console(f"resumed from {folder} at step {self.step}")
            elif self.cfg.trainer.resume:
                console(f"trainer.resume=true: no checkpoint in {self.run_dir}, starting at step 0")

    def final_hf_dir(self) -> Path:
        return self.run_dir / "final"

    def save_final(self) -> None:
        tmp = self.run_dir / "final.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        eng.barrier()
        self.engine.save_hf(tmp, self.processor)
        eng.barrier()
        if self.rank == 0:
            atomic_directory_swap(tmp, self.final_hf_dir())
        eng.barrier()

    def make_logger(self) -> MetricsLogger:
        lc = self.cfg.logger
        return MetricsLogger(
            self.run_dir, enabled=self.rank == 0, max_steps=self.cfg.trainer.max_steps,
            backend=lc.backend, wandb_mode=lc.wandb_mode, project=lc.project,
            run_name=run_label(self.cfg), progress=lc.progress, start_step=self.step,
        )

    def close(self) -> None:
        """Release the engine (policy, optimizer, reference and DeepSpeed's hooks on them); the
        trainer cannot train afterwards. Every rank; ``engine.release_memory()`` then frees it."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def train_step(self, step: int) -> dict[str, float]:
        raise NotImplementedError

    def fit(self) -> Path:
        """Run to ``trainer.max_steps`` (resuming if asked); return the final HF folder."""
        self.maybe_resume()
        logger = self.logger
        logger.start(self.step)
        tc = self.cfg.trainer
        while self.step < tc.max_steps:
            runtime.seed_step(self.cfg.seed, self.step, self.rank)
            t0 = time.time()
            metrics = self.train_step(self.step)
            metrics["time/step_s"] = time.time() - t0
            if torch.cuda.is_available():
                metrics["memory/peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            metrics["data/skipped"] = float(self.skipped_images)
            if self.step % tc.log_every == 0 or self.step == tc.max_steps - 1:
                logger.log(self.step, metrics)
            self.step += 1
            if tc.save_every and (self.step % tc.save_every == 0 or self.step == tc.max_steps):
                self.save_checkpoint()
        self.save_final()
        logger.close()
        return self.final_hf_dir()


def latest_checkpoint_everywhere(run_dir: Path) -> tuple[int, Path] | None:
    """Rank 0's view of the newest complete checkpoint, shared with every rank."""
    found = runtime.latest_checkpoint(run_dir) if eng.dist_rank() == 0 else None
    return eng.broadcast_object(found)
