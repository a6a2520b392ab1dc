"""The GRPO training loop with the reward curriculum (PAPER.md §2–3). The loop holds no formula.

One step: rollout (G samples per prompt, groups local to a rank) -> rewards under the schedule's
current threshold -> curriculum update from the IoUs of ALL ranks (every rank holds the same τ) ->
group advantages -> mu policy updates over micro-batches (loss normalised by global counts) ->
log -> checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medloc import engine as eng
from medloc import runtime
from medloc.config import RunConfig, run_label
from medloc.curriculum import build_scheduler
from medloc.data.dataset import GroundingDataset, ImageLoadError
from medloc.grpo.advantages import group_advantages
from medloc.grpo.loss import grpo_loss
from medloc.grpo.rollout import completion_logprobs, rewards, rollout, slice_batch
from medloc.logging import MetricsLogger
from medloc.models.loading import load_processor, vision_token_ids


class TrainingStopped(RuntimeError):
    """Raised when the run cannot go on (e.g. too many non-finite losses in a row)."""


def engine_spec(cfg: RunConfig, model_path: str, *, micro_steps: int, with_reference: bool
                ) -> eng.EngineSpec:
    return eng.EngineSpec(
        model_path=model_path,
        zero_stage=cfg.engine.zero_stage,
        precision=cfg.model.precision,
        offload_optimizer=cfg.engine.offload_optimizer,
        offload_params=cfg.engine.offload_params,
        attn_implementation=cfg.model.attn_implementation,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        freeze_vision=cfg.model.freeze_vision,
        lr=cfg.optim.lr,
        betas=(cfg.optim.betas[0], cfg.optim.betas[1]),
        weight_decay=cfg.optim.weight_decay,
        warmup_steps=cfg.optim.warmup_steps,
        grad_clip=cfg.optim.grad_clip,
        micro_batch_size=cfg.model.micro_batch_size,
        grad_accum_steps=micro_steps,
        with_reference=with_reference,
    )


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
        self.engine = eng.Engine(
            engine_spec(cfg, model_path, micro_steps=self.micro_steps, with_reference=with_reference)
        )
        self.processor = load_processor(
            model_path, min_pixels=cfg.dataset.min_pixels, max_pixels=cfg.dataset.max_pixels
        )
        self.data = GroundingDataset(Path(cfg.dataset.dir) / f"{cfg.dataset.train_split}.jsonl")
        if cfg.dataset.max_train_samples is not None:
            self.data.records = self.data.records[: cfg.dataset.max_train_samples]
        self.step = 0
        self.skipped_images = 0
        self.bad_steps_in_row = 0
        self.nonfinite_total = 0

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
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        eng.barrier()
        self.engine.save_engine_state(tmp, client_state={"step": self.step})
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
            runtime.write_json_atomic(tmp / "trainer_state.json", state)
            eng.atomic_directory_swap(tmp, final)
            runtime.prune_checkpoints(self.run_dir, self.cfg.trainer.keep_last)
        eng.barrier()

    def maybe_resume(self) -> None:
        if not self.cfg.trainer.resume:
            return
        found = latest_checkpoint_everywhere(self.run_dir)
        if found is None:
            return
        _, folder = found

        state = json.loads((folder / "trainer_state.json").read_text())
        self.engine.load_engine_state(folder)
        self.step = int(state["step"])
        self.skipped_images = int(state.get("skipped_images", 0))
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        self.load_extra_state(state)
        if self.rank == 0:
            runtime.truncate_jsonl(self.run_dir / "metrics.jsonl", self.step - 1)
            runtime.truncate_jsonl(self.run_dir / "samples.jsonl", self.step - 1)
            runtime.truncate_jsonl(self.run_dir / "ious.jsonl", self.step - 1)
            print(f"resumed from {folder} at step {self.step}", flush=True)

    def final_hf_dir(self) -> Path:
        return self.run_dir / "final"

    def save_final(self) -> None:
        tmp = self.run_dir / "final.tmp"
        if self.rank == 0:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        eng.barrier()
        self.engine.save_hf(tmp, self.processor)
        eng.barrier()
        if self.rank == 0:
            eng.atomic_directory_swap(tmp, self.final_hf_dir())
        eng.barrier()

    def make_logger(self) -> MetricsLogger:
        lc = self.cfg.logger
        return MetricsLogger(
            self.run_dir, enabled=self.rank == 0, max_steps=self.cfg.trainer.max_steps,
            backend=lc.backend, wandb_mode=lc.wandb_mode, project=lc.project,
            run_name=run_label(self.cfg), progress=lc.progress, start_step=self.step,
        )

    def train_step(self, step: int) -> dict[str, float]:
        raise NotImplementedError

    def fit(self) -> Path:
        """Run to ``trainer.max_steps`` (resuming if asked); return the final HF folder."""
        self.maybe_resume()
        logger = self.make_logger()
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


class GRPOTrainer(BaseTrainer):
    """GRPO with the threshold curriculum (PAPER.md §2–3)."""

    method = "grpo"

    def __init__(self, cfg: RunConfig, run_dir: Path, model_path: str):
        g = cfg.grpo.num_generations
        super().__init__(
            cfg, run_dir, model_path,
            samples_per_step=cfg.trainer.prompts_per_step,
            rows_per_step=cfg.trainer.prompts_per_step * g,
            with_reference=cfg.grpo.beta > 0,
        )
        self.scheduler = build_scheduler(cfg.curriculum, total_steps=cfg.trainer.max_steps)
        self.suppress = vision_token_ids(self.processor)

    def extra_state(self) -> dict[str, Any]:
        return {"curriculum": self.scheduler.state_dict(),
                "bad_steps_in_row": self.bad_steps_in_row}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state["curriculum"])
        self.bad_steps_in_row = int(state.get("bad_steps_in_row", 0))

    def train_step(self, step: int) -> dict[str, float]:
        cfg, gc = self.cfg, self.cfg.grpo
        records, images, problems = self.load_step_samples(step)
        for p in problems:
            print(f"[data] skipped unreadable image {p}", flush=True)

        # 1. rollout with the policy (ZeRO-3: parameters gathered once, hooks off)
        t0 = time.time()
        with self.engine.generation_context() as model:
            ro = rollout(
                model, self.processor, records, images,
                answer_format=cfg.reward.answer_format, num_generations=gc.num_generations,
                temperature=gc.temperature, top_p=gc.top_p, max_new_tokens=gc.max_new_tokens,
                suppress_token_ids=self.suppress,
            )
        t_gen = time.time() - t0

        # 2. rewards under the threshold the schedule holds for this step
        sched = self.scheduler
        reward, reward_metrics = rewards(
            ro.ious, ro.parsed, kind=sched.reward_kind, threshold=sched.tau, op=sched.op,
            accuracy_weight=cfg.reward.accuracy_weight, format_weight=cfg.reward.format_weight,
        )

        # 3. curriculum update from every rank's IoUs (identical input -> identical τ everywhere)
        all_ious = eng.all_gather_1d(torch.as_tensor(ro.ious, dtype=torch.float64)).numpy()
        curriculum_metrics = sched.observe(step, all_ious)
        if self.rank == 0:
            # The IoU trajectory, replayable offline: python -m medloc.curriculum.replay --trajectory
            with open(self.run_dir / "ious.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "ious": [round(float(x), 6) for x in all_ious]})
                        + "\n")

        # 4. advantages within each local group; dead-group statistics over all ranks
        rewards_t = torch.as_tensor(reward, dtype=torch.float32)  # [N]
        adv, adv_metrics = group_advantages(
            rewards_t, gc.num_generations, eps=gc.adv_eps, std_estimator=gc.adv_std
        )
        adv_metrics = self._global_means(adv_metrics, weight=len(records))
        reward_metrics = self._global_means(reward_metrics, weight=len(records))

        # 5. policy update(s)
        t0 = time.time()
        update_metrics = self._update(ro.batch, adv, dead=adv_metrics["reward/dead_group_frac"])
        t_update = time.time() - t0

        parsed_ok = np.asarray([p.box is not None for p in ro.parsed], dtype=np.float64)
        fmt_ok = np.asarray([p.format_ok for p in ro.parsed], dtype=np.float64)
        local = {
            "iou/mean": float(ro.ious.mean()),
            "reward/parse_rate": float(parsed_ok.mean()),
            "reward/format_rate": float(fmt_ok.mean()),
            "completion/length": float(ro.batch["completion_mask"].sum(1).float().mean()),
        }
        metrics = {
            **reward_metrics, **adv_metrics, **curriculum_metrics, **update_metrics,
            **self._global_means(local, weight=len(records)),
            "time/generate_s": t_gen, "time/update_s": t_update,
        }
        if self.rank == 0 and cfg.trainer.sample_every and step % cfg.trainer.sample_every == 0:
            rows = [
                {"id": ro.record_ids[i], "completion": ro.texts[i], "iou": float(ro.ious[i]),
                 "reward": float(reward[i]), "pred_box": ro.pred_boxes[i],
                 "gt_box": ro.gt_boxes[i].tolist()}
                for i in range(min(len(ro.texts), 2 * gc.num_generations))
            ]
            self._sample_rows = rows
            MetricsLogger.log_samples(self._logger_for_samples(), step, rows)
        return metrics

    def _logger_for_samples(self) -> MetricsLogger:
        if not hasattr(self, "_sample_logger"):
            self._sample_logger = MetricsLogger(self.run_dir, enabled=self.rank == 0, max_steps=0,
                                                progress=False)
        return self._sample_logger

    def _global_means(self, metrics: dict[str, float], weight: int) -> dict[str, float]:
        """Average per-rank metrics over ranks (weighted by each rank's prompts)."""
        if self.world == 1:
            return dict(metrics)
        keys = sorted(metrics)
        vals = torch.tensor([metrics[k] * weight for k in keys] + [float(weight)], dtype=torch.float64)
        tot = eng.all_reduce_sum(vals)
        return {k: float(tot[i] / tot[-1]) for i, k in enumerate(keys)}

    def _update(self, batch: dict[str, torch.Tensor], adv: torch.Tensor, dead: float
                ) -> dict[str, float]:
        gc = self.cfg.grpo
        n = adv.shape[0]
        mb = self.cfg.model.micro_batch_size
        bounds = [(s, min(s + mb, n)) for s in range(0, n, mb)]
        mask = batch["completion_mask"]  # [N, L]
        global_tokens = float(eng.all_reduce_sum(mask.sum().double()))
        global_seqs = float(eng.all_reduce_sum(torch.tensor(float(n), dtype=torch.float64)))
        module = self.engine.module

        # reference and (mu > 1) old-policy log-probs, without grad
        ref_logp, old_logp = [], []
        with torch.no_grad():
            for s, e in bounds:
                part = slice_batch(batch, s, e)
                if self.engine.reference is not None:
                    ref_logp.append(completion_logprobs(self.engine.reference, part,
                                                        temperature=gc.temperature,
                                                        suppress_token_ids=self.suppress).cpu())
                if gc.mu > 1:
                    old_logp.append(completion_logprobs(module, part, temperature=gc.temperature,
                                                        suppress_token_ids=self.suppress).cpu())

        if gc.skip_dead_steps and dead >= 1.0:
            return {"train/skipped_dead_step": 1.0}

        sums: dict[str, float] = {}
        nonfinite = 0
        applied = False
        for _ in range(gc.mu):
            finite = 0  # micro-batches of this optimizer step whose gradient is kept
            for i, (s, e) in enumerate(bounds):
                part = slice_batch(batch, s, e)
                logp = completion_logprobs(self.policy_module(), part, temperature=gc.temperature,
                                                        suppress_token_ids=self.suppress)
                dev = logp.device
                loss, m = grpo_loss(
                    logp,
                    old_logp[i].to(dev) if old_logp else None,
                    ref_logp[i].to(dev) if ref_logp else None,
                    adv[s:e].to(dev),
                    part["completion_mask"].to(dev),
                    eps_low=gc.eps_low, eps_high=gc.eps_high, beta=gc.beta,
                    aggregation=gc.aggregation, global_tokens=global_tokens,
                    global_sequences=global_seqs, max_completion_len=gc.max_new_tokens,
                )
                bad = float(eng.all_reduce_sum(torch.tensor(float(not torch.isfinite(loss)))))
                if bad == 0:
                    self.engine.backward(loss)
                    finite += 1
                else:
                    nonfinite += 1  # this micro-batch's gradient is left out (on every rank)
                    self.engine.backward_nothing()
                self.engine.micro_step(apply_update=finite > 0)
                w = (e - s) / n
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + w * v / gc.mu
            applied = applied or finite > 0
        self._count_nonfinite(nonfinite)
        out = self._global_means(sums, weight=n)
        out["train/nonfinite_microbatches"] = float(nonfinite)
        out["optim/lr"] = self.engine.lr()
        gn = self.engine.grad_norm() if applied else None
        if gn is not None:
            out["optim/grad_norm"] = gn
        return out

    def policy_module(self) -> torch.nn.Module:
        # Forward through the DeepSpeed engine so ZeRO-3 hooks gather parameters.
        return self.engine.policy

    def _count_nonfinite(self, nonfinite: int) -> None:
        self.nonfinite_total += nonfinite
        self.bad_steps_in_row = self.bad_steps_in_row + 1 if nonfinite else 0
        if self.bad_steps_in_row >= self.cfg.trainer.max_bad_steps:
            raise TrainingStopped(
                f"{self.bad_steps_in_row} steps in a row had a non-finite loss (limit "
                f"trainer.max_bad_steps={self.cfg.trainer.max_bad_steps}); stopping. Lower optim.lr "
                f"or check the data; the last complete checkpoint is in {self.run_dir / 'checkpoints'}"
            )
