"""Run plumbing shared by the GRPO and SFT trainers: batches per step, seeding, checkpoints.

Exact resume rests on two choices made here:

- the data order is a pure function of (seed, step): step k of an epoch takes a fixed slice of a
  seeded permutation, so no sampler state needs saving;
- the random state is re-seeded at the start of every step from (seed, step, rank), so a resumed
  run draws the same samples as an uninterrupted one.

A checkpoint is a folder ``checkpoints/step_NNNNNNN`` written under a temporary name and renamed
only when complete (a run killed mid-write leaves a ``.tmp`` folder that resume ignores). It holds
``hf/`` (the policy as an ordinary Hugging Face folder + processor: ``from_pretrained`` loads it),
``engine/`` (DeepSpeed weights, optimizer and lr-scheduler state) and ``trainer_state.json``
(step, curriculum state with its raise history, counters).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

CKPT_DIR = "checkpoints"
_STEP_RE = re.compile(r"^step_(\d{7})$")


def step_indices(n_items: int, step: int, per_step: int, seed: int) -> list[int]:
    """Global dataset indices of step ``step`` (0-based): a slice of a seeded permutation per epoch.

    Steps never straddle epochs: an epoch holds ``n_items // per_step`` steps (the tail is dropped);
    epoch e uses the permutation drawn from ``seed + e``.
    """
    if per_step > n_items:
        raise ValueError(
            f"{per_step} samples per step but the dataset has only {n_items}: lower the batch size"
        )
    steps_per_epoch = n_items // per_step
    epoch, within = divmod(step, steps_per_epoch)
    perm = np.random.default_rng(seed + epoch).permutation(n_items)
    return perm[within * per_step:(within + 1) * per_step].tolist()


def rank_slice(items: list[Any], rank: int, world: int) -> list[Any]:
    """This rank's contiguous share of a global list whose length is a multiple of ``world``."""
    if len(items) % world:
        raise ValueError(f"{len(items)} items cannot be split evenly over {world} ranks")
    per = len(items) // world
    return items[rank * per:(rank + 1) * per]


def seed_step(seed: int, step: int, rank: int) -> None:
    """Seed python, numpy and torch from (seed, step, rank): a resumed step samples identically."""
    s = int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step_{step:07d}"


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_RE.match(child.name)
        if m and child.is_dir() and (child / "trainer_state.json").is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> tuple[int, Path] | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints and any stale ``.tmp`` folder."""
    found = complete_checkpoints(run_dir)
    for _, folder in found[:-keep_last]:
        shutil.rmtree(folder, ignore_errors=True)
    root = Path(run_dir) / CKPT_DIR
    if root.is_dir():
        for child in root.iterdir():
            if child.name.endswith(".tmp"):
                shutil.rmtree(child, ignore_errors=True)


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop lines whose ``step`` is after ``last_step`` (a resumed run rewrites them)."""
    path = Path(path)
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", -1) <= last_step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill mid-write
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
