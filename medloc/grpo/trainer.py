"""The GRPO training loop with the reward curriculum (docs/method.md §2–3). The loop holds no formula.

One step: rollout (G samples per prompt, groups local to a rank) -> rewards under the schedule's
current threshold -> curriculum update from the IoUs of ALL ranks (every rank holds the same τ) ->
group advantages -> mu policy updates over micro-batches (loss normalised by global counts) ->
log -> checkpoint.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medloc import engine as eng
from medloc import generation as gen
from medloc.base_trainer import BaseTrainer, TrainingStopped
from medloc.config import RunConfig
from medloc.curriculum import build_scheduler
from medloc.data import collate
from medloc.data.collate import slice_batch
from medloc.grpo.advantages import group_advantages
from medloc.grpo.loss import grpo_loss
from medloc.grpo.rollout import Rollout, rollout
from medloc.logging import console
from medloc.models.loading import vision_token_ids
from medloc.models.logprobs import (
    completion_logprobs,
    prompt_image_features,
    prompts_of_rows,
    shared_prefix_logprobs,
)
from medloc.rewards import total_rewards


@functools.cache
def _has_cuda() -> bool:
    # Asked once per process: deepspeed sets PYTORCH_NVML_BASED_CUDA_CHECK=1, with which every
    # torch.cuda.is_available() loads NVML again (a dlopen, 0.1-0.4 ms), seven times per step.
    return torch.cuda.is_available()


def _synced_time() -> float:
    """Wall clock after the GPU's queued work is done (phase timings; one sync per phase)."""
    if _has_cuda():
        torch.cuda.synchronize()
    return time.perf_counter()


class GRPOTrainer(BaseTrainer):
    """GRPO with the threshold curriculum (docs/method.md §2–3)."""

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
            console(f"[data] skipped unreadable image {p}")

        # 1. rollout with the policy (ZeRO-3: parameters gathered once, hooks off)
        t0 = _synced_time()
        ro = self.sample(records, images)
        t_gen = _synced_time() - t0

        # 2. rewards under the threshold the schedule holds for this step
        sched = self.scheduler
        reward, reward_metrics = total_rewards(
            ro.ious, ro.parsed, kind=cfg.reward.kind, threshold=sched.tau, op=sched.op,
            accuracy_weight=cfg.reward.accuracy_weight, format_weight=cfg.reward.format_weight,
            hybrid_lambda=cfg.reward.hybrid_lambda, band_width=cfg.reward.band_width,
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
        t0 = _synced_time()
        update_metrics = self.update(ro.batch, adv, dead=adv_metrics["reward/dead_group_frac"],
                                     image_features=ro.image_features)
        t_update = _synced_time() - t0

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
            # decoded positions (rows x steps, padding after EOS included) per second
            "time/generate_tokens_per_s": ro.completion_ids.numel() / max(t_gen, 1e-9),
        }
        if self.rank == 0 and cfg.trainer.sample_every and step % cfg.trainer.sample_every == 0:
            rows = [
                {"id": ro.record_ids[i], "completion": ro.texts[i], "iou": float(ro.ious[i]),
                 "reward": float(reward[i]), "pred_box": ro.pred_boxes[i],
                 "gt_box": ro.gt_boxes[i].tolist()}
                for i in range(min(len(ro.texts), 2 * gc.num_generations))
            ]
            self.logger.log_samples(step, rows)
        return metrics

    def _global_means(self, metrics: dict[str, float], weight: int) -> dict[str, float]:
        """Average per-rank metrics over ranks (weighted by each rank's prompts)."""
        if self.world == 1:
            return dict(metrics)
        keys = sorted(metrics)
        vals = torch.tensor([metrics[k] * weight for k in keys] + [float(weight)], dtype=torch.float64)
        tot = eng.all_reduce_sum(vals)
        return {k: float(tot[i] / tot[-1]) for i, k in enumerate(keys)}

    def sample(self, records: Sequence[Any], images: Sequence[Any]) -> Rollout:
        """Phase 1 of a step: G completions per record from the policy, decoded and scored.

        The policy in eval mode, parameters gathered once under ZeRO-3 (``generation_context``).
        Seed the global generator first for a reproducible rollout (``fit`` calls
        ``runtime.seed_step``).
        """
        cfg, gc = self.cfg, self.cfg.grpo
        with self.engine.generation_context() as model:
            return rollout(
                model, self.processor, records, images,
                answer_format=cfg.reward.answer_format, parse_rule=cfg.reward.parse_rule,
                num_generations=gc.num_generations,
                temperature=gc.temperature, top_p=gc.top_p, max_new_tokens=gc.max_new_tokens,
                suppress_token_ids=self.suppress, cache=gc.kv_cache,
                compile_decode=gc.compile_decode,
            )

    def update(self, batch: dict[str, torch.Tensor], adv: torch.Tensor, dead: float,
               image_features: Sequence[torch.Tensor] | None = None) -> dict[str, float]:
        """Phase 5 of a step: reference / old-policy log-probs, then ``mu`` optimizer steps over
        micro-batches of ``batch`` (a rollout's ``batch``, N rows) with advantages ``adv`` [N].

        ``dead``: the fraction of dead groups (all advantages 0) over all ranks; with
        ``grpo.skip_dead_steps`` a step with ``dead >= 1`` stops after the reference forwards.

        ``image_features``: the sampling policy's vision features, one per prompt (row r shows
        image r // G), from the rollout. They stand in for the vision tower in the old-policy
        forward (same weights) and, when the tower is frozen (``model.freeze_vision``), in the
        reference and policy forwards too: then the tower runs once per image per step. A
        trainable tower needs the gradient, so the policy computes its own features, with grad,
        once per image per micro-batch (``prompt_image_features``: once per group when a
        micro-batch holds whole groups, once per micro-batch for a group that micro-batches
        split), hands them to the image's rows, and the gradients of all of them flow back into
        that one forward of the tower; the reference's own tower runs once per image.
        None: every forward runs its tower on every row (each row its own copy of the image;
        the exactness baseline of the tests).

        ``grpo.shared_prefix_update`` (default): every forward runs each prompt of a micro-batch
        through the language model once and its completions over that prompt's keys/values
        (``shared_prefix_logprobs``: B x P + N x (L-1) tokens instead of N x (P+L)); with grad in
        the policy forward, the gradients of all the prompt's rows flow into its one prefix.
        A micro-batch that splits a group computes that prompt's prefix once for the rows it
        holds (any ``model.micro_batch_size`` works; whole groups share the most). The image
        features above go to the prefix, one per prompt. false: each row's prompt + completion
        in one forward (``completion_logprobs``), the arithmetic of runs before the switch.
        """
        gc = self.cfg.grpo
        g = gc.num_generations
        shared = gc.shared_prefix_update  # each prompt once per micro-batch (shared_prefix_logprobs)
        n = adv.shape[0]
        mb = self.cfg.model.micro_batch_size
        bounds = [(s, min(s + mb, n)) for s in range(0, n, mb)]
        mask = batch["completion_mask"]  # [N, L]
        global_tokens = float(eng.all_reduce_sum(mask.sum().double()))
        global_seqs = float(eng.all_reduce_sum(torch.tensor(float(n), dtype=torch.float64)))
        module = self.engine.module
        frozen = self.cfg.model.freeze_vision
        policy_feats = image_features if (image_features is not None and frozen) else None
        ref_feats = policy_feats
        reference = self.engine.reference
        if reference is not None and image_features is not None and not frozen:
            with torch.no_grad():  # the reference's own tower, once per image
                ref_feats = gen.image_features(getattr(reference, "module", reference),
                                               collate.every_nth_row(batch, g))

        def rows(feats: Sequence[torch.Tensor] | None, s: int, e: int):
            return None if feats is None else gen.rows_features(feats, range(s, e), g)

        def policy_rows(s: int, e: int) -> list[torch.Tensor] | None:
            """The policy forward's features for rows [s, e): the rollout's for a frozen tower;
            a trainable tower's own, with grad, once per image of these rows."""
            if policy_feats is not None or image_features is None:
                return rows(policy_feats, s, e)
            prompts = prompts_of_rows(range(s, e), g)
            feats = prompt_image_features(module, batch, prompts, g)  # one per prompt, with grad
            first = prompts.start * g  # row index of feats[0]'s first row
            return gen.rows_features(feats, range(s - first, e - first), g)

        def prompts_feats(feats: Sequence[torch.Tensor] | None, s: int, e: int):
            if feats is None:
                return None
            prompts = prompts_of_rows(range(s, e), g)
            return list(feats[prompts.start:prompts.stop])

        def policy_prompts(s: int, e: int) -> Sequence[torch.Tensor] | None:
            """``policy_rows`` per prompt of rows [s, e) (the shared-prefix forward)."""
            if policy_feats is not None or image_features is None:
                return prompts_feats(policy_feats, s, e)
            return prompt_image_features(module, batch, prompts_of_rows(range(s, e), g), g)

        # reference and (mu > 1) old-policy log-probs, without grad
        t0 = _synced_time()
        ref_logp, old_logp = [], []
        with torch.no_grad():
            for s, e in bounds:
                part = slice_batch(batch, s, e)
                if shared:
                    if reference is not None:
                        ref_logp.append(shared_prefix_logprobs(
                            reference, part, range(s, e), g, temperature=gc.temperature,
                            suppress_token_ids=self.suppress,
                            prompt_features=prompts_feats(ref_feats, s, e)))
                    if gc.mu > 1:
                        old_logp.append(shared_prefix_logprobs(
                            module, part, range(s, e), g, temperature=gc.temperature,
                            suppress_token_ids=self.suppress,
                            prompt_features=prompts_feats(image_features, s, e)))
                    continue
                if reference is not None:
                    ref_logp.append(completion_logprobs(
                        reference, part, temperature=gc.temperature,
                        suppress_token_ids=self.suppress, image_features=rows(ref_feats, s, e)))
                if gc.mu > 1:
                    old_logp.append(completion_logprobs(
                        module, part, temperature=gc.temperature, suppress_token_ids=self.suppress,
                        image_features=rows(image_features, s, e)))

        t_reference = _synced_time() - t0
        if gc.skip_dead_steps and dead >= 1.0:
            return {"train/skipped_dead_step": 1.0, "time/reference_s": t_reference}

        sums: dict[str, torch.Tensor] = {}
        nonfinite = 0
        applied = False
        for _ in range(gc.mu):
            for i, (s, e) in enumerate(bounds):
                part = slice_batch(batch, s, e)
                # A trainable tower runs here, outside the DeepSpeed engine's forward: ZeRO-3's
                # per-submodule hooks gather its parameters; the forward below (through the
                # engine) carries its output, and the backward reaches it through that.
                if shared:
                    logp = shared_prefix_logprobs(
                        self.policy_module(), part, range(s, e), g, temperature=gc.temperature,
                        suppress_token_ids=self.suppress, prompt_features=policy_prompts(s, e))
                else:
                    logp = completion_logprobs(self.policy_module(), part,
                                               temperature=gc.temperature,
                                               suppress_token_ids=self.suppress,
                                               image_features=policy_rows(s, e))
                dev = logp.device
                loss, m = grpo_loss(
                    logp,
                    old_logp[i] if old_logp else None,
                    ref_logp[i] if ref_logp else None,
                    adv[s:e].to(dev),
                    part["completion_mask"].to(dev),
                    eps_low=gc.eps_low, eps_high=gc.eps_high, beta=gc.beta,
                    aggregation=gc.aggregation, global_tokens=global_tokens,
                    global_sequences=global_seqs, max_completion_len=gc.max_new_tokens,
                )
                # Agreed over ranks (the one host synchronisation per micro-batch): a non-finite
                # micro-batch's gradient is left out on every rank.
                if self.engine.backward_if_finite(loss):
                    applied = True
                else:
                    nonfinite += 1
                w = (e - s) / n
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + w * v / gc.mu
        t_policy = _synced_time() - t0 - t_reference
        self._count_nonfinite(nonfinite)
        out = self._global_means({k: float(v) for k, v in sums.items()}, weight=n)
        out["time/reference_s"] = t_reference  # reference (and old-policy) log-probs
        out["time/policy_s"] = t_policy  # policy forward + backward + optimizer step(s)
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
