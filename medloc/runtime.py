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

What a new command does with a run folder that already holds results is decided once, at start,
by ``plan_run_folder`` (it compares the folder's ``resolved_config.json`` with the new resolved
configuration): skip a finished run of the same configuration, continue it (``trainer.resume=true``,
also to a larger ``trainer.max_steps``), start over, or stop naming the keys that differ. Its
docstring is the reference; ``MAY_DIFFER`` lists the keys allowed to differ and why.

Continuing to a larger ``trainer.max_steps`` gives exactly the straight run of the new length when
nothing depends on the length: the lr schedule is linear warmup then constant (medloc/engine.py),
the data order and the random state depend on (seed, step) only, and the MedLoc-R1, fixed and
raw-IoU schedules follow the IoUs, not the step count. The progress-based schedules (V-Triune,
fixed-conservative/moderate/aggressive) set τ from t/T with T = ``trainer.max_steps``: the steps
already taken used the old T, so a continued run would follow neither schedule. That case stops at
start; ``force=true`` reruns all steps with the new T.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medloc.atomic import atomic_write_text
from medloc.jsonl import read_jsonl

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
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")  # kept lines are written back as they were, not re-serialised
    rows = read_jsonl(path, text=text, bad="skip")  # skip: a line cut by a kill mid-write
    keep = [lines[n - 1] for n, row in rows if row.get("step", -1) <= last_step]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


# -- what a new command does with an existing run folder ---------------------------------------

CONFIG_FILE = "resolved_config.json"
# Everything a run writes besides its configuration and run_info.json: a folder holding any of these
# holds results of the configuration in CONFIG_FILE.
RESULTS = ("metrics.jsonl", "samples.jsonl", "ious.jsonl", CKPT_DIR, "final", "final.tmp", "eval")

# Keys (or key prefixes) of the resolved configuration that may differ between the configuration a
# folder's results were made with and a new command for the same folder: they change how a run is
# driven, checkpointed or reported, never what it computes. Exact resume (data order and random
# state from (seed, step); full engine and scheduler state in each checkpoint) makes the results
# independent of where a run was cut and of how often it saved. Hydra's own settings (hydra.run.dir,
# hydra.sweep.*, the launcher) are not part of the resolved configuration and never count.
# ``trainer.max_steps`` may differ only with ``trainer.resume=true`` (see plan_run_folder).
MAY_DIFFER: dict[str, str] = {
    "force": "how to treat the folder's results, not what is run",
    "trainer.resume": "continuing from the newest checkpoint reproduces the straight run",
    "trainer.save_every": "checkpoint cadence (exact resume: results do not depend on it)",
    "trainer.keep_last": "how many checkpoints are kept on disk",
    "trainer.log_every": "which steps get a metrics.jsonl row",
    "trainer.sample_every": "which steps write sample completions (from rollouts made anyway)",
    "trainer.eval_after": "whether the final policy is evaluated (finished = evaluated)",
    "logger": "where metrics go (jsonl, wandb) and the console progress line",
}

# Config groups a method never reads: a difference there cannot change its results (e.g. a sweep's
# ``-- grpo.beta=0.1`` reaches the SFT stand-in too, whose finished run must still be reused).
NOT_READ_BY: dict[str, tuple[str, ...]] = {
    "grpo": ("trainer.sft_batch_size",),
    "sft": ("grpo", "curriculum", "trainer.prompts_per_step"),
    "zero_shot": ("grpo", "curriculum", "optim", "engine", "trainer"),  # evaluates init_from as is
}

_MISSING = "<missing>"


class RunFolderConflict(RuntimeError):
    """The run folder holds results that this command must not reuse or extend (see the message)."""


@dataclass(frozen=True)
class FolderPlan:
    """What to do with the run folder before training.

    ``action``: ``skip`` (finished, same configuration: nothing to do), ``start`` (from step 0) or
    ``continue`` (``trainer.resume=true``: from the newest checkpoint). ``remove``: names under the
    folder to delete first (results that the run would otherwise mix with its own). ``note``: one
    console line, or "".
    """

    action: str
    remove: tuple[str, ...] = ()
    note: str = ""


def flatten_config(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and scalars are leaves."""
    flat: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, name + "."))
        else:
            flat[name] = value
    return flat


def _under(key: str, prefixes: Any) -> bool:
    return any(key == k or key.startswith(k + ".") for k in prefixes)


def config_differences(stored: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (stored value, current value) for every key whose value differs, including
    keys only one side has (shown as ``<missing>``); left out: the keys of ``MAY_DIFFER`` and the
    groups the current method never reads (``NOT_READ_BY``; a different ``method`` always counts).
    Values are compared after a JSON round trip (tuples == lists, as the stored file holds them)."""
    a = flatten_config(json.loads(json.dumps(stored)))
    b = flatten_config(json.loads(json.dumps(current)))
    ignored = (*MAY_DIFFER, *NOT_READ_BY.get(str(current.get("method")), ()))
    return {k: (a.get(k, _MISSING), b.get(k, _MISSING)) for k in sorted(set(a) | set(b))
            if a.get(k, _MISSING) != b.get(k, _MISSING) and not _under(k, ignored)}


def present_results(run_dir: Path) -> tuple[str, ...]:
    return tuple(name for name in RESULTS if (Path(run_dir) / name).exists())


def is_finished(run_dir: Path, eval_after: bool) -> bool:
    """Evaluated (``eval/metrics.json``), or, for a run that does not evaluate, trained (``final/``)."""
    run_dir = Path(run_dir)
    if (run_dir / "eval" / "metrics.json").is_file():
        return True
    return not eval_after and (run_dir / "final").is_dir()


def plan_run_folder(run_dir: Path, config: dict[str, Any], *, progress_schedule: bool
                    ) -> FolderPlan:
    """Decide, before anything is built, what this command does with ``run_dir``.

    ``config`` is the new resolved configuration (the dict written to ``resolved_config.json``);
    ``progress_schedule``: the run's τ depends on t / trainer.max_steps (V-Triune, fixed presets).

    - ``force=true``: delete the folder's results and start from step 0.
    - no results yet: start.
    - results but no ``resolved_config.json``: stop (what made them is unknown).
    - any key differs, outside ``MAY_DIFFER`` and ``trainer.max_steps``: stop, naming every key
      with its stored and new value (the results belong to the stored configuration).
    - same configuration: finished -> skip; else ``trainer.resume=true`` -> continue from the
      newest checkpoint (a cut evaluation resumes too; with no checkpoint, training restarts at
      step 0 and an old ``final/`` or ``eval/`` is removed), ``trainer.resume=false`` -> start over.
    - only ``trainer.max_steps`` differs: with ``trainer.resume=true``, continue from the newest
      checkpoint to the new length and evaluate again (the old ``final/`` and ``eval/`` belong to
      the old length and are removed) -- unless τ depends on t/T (progress schedule) or the newest
      checkpoint is already past the new length: stop. With ``trainer.resume=false``: stop.
    """
    run_dir = Path(run_dir)
    present = present_results(run_dir)
    if config["force"]:
        note = f"force=true: removed {', '.join(present)} from {run_dir}; starting over" \
            if present else ""
        return FolderPlan("start", present, note)
    if not present:
        return FolderPlan("start")
    stored_path = run_dir / CONFIG_FILE
    rerun = "Use another hydra.run.dir, or force=true to delete its results and rerun here."
    if not stored_path.is_file():
        raise RunFolderConflict(
            f"{run_dir} holds results ({', '.join(present)}) but no {CONFIG_FILE}: the "
            f"configuration that made them is unknown. {rerun}")
    stored = json.loads(stored_path.read_text())
    diff = config_differences(stored, config)
    length = diff.pop("trainer.max_steps", None)
    if diff:
        lines = "\n".join(f"  {k}: {old!r} (stored) -> {new!r} (this command)"
                          for k, (old, new) in diff.items())
        if length is not None:
            lines += f"\n  trainer.max_steps: {length[0]!r} (stored) -> {length[1]!r} (this command)"
        if any(_MISSING in pair for pair in diff.values()):
            lines += f"\n({_MISSING}: the key exists on one side only -- the results were made " \
                     f"by another version of the code)"
        raise RunFolderConflict(
            f"{run_dir} holds results of another configuration ({stored_path}); this command "
            f"differs in {len(diff) + (length is not None)} key(s):\n{lines}\n"
            f"Its results would be reported as this configuration's. {rerun}")
    resume = bool(config["trainer"]["resume"])
    if length is None:
        if is_finished(run_dir, bool(config["trainer"]["eval_after"])):
            return FolderPlan("skip", note=f"[skip] {run_dir} already has the results of this "
                                           f"configuration (force=true reruns it)")
        if resume:
            if config["method"] != "zero_shot" and latest_checkpoint(run_dir) is None:
                # Nothing to continue from: training starts at step 0, so a final policy or an
                # evaluation left by an earlier attempt is not this attempt's.
                stale = tuple(name for name in ("final", "final.tmp", "eval") if name in present)
                return FolderPlan("continue", stale, f"removed {', '.join(stale)} (no checkpoint "
                                                     f"to continue from)" if stale else "")
            return FolderPlan("continue")
        return FolderPlan("start", present,
                          f"trainer.resume=false: starting {run_dir} over (removed "
                          f"{', '.join(present)}; trainer.resume=true would continue it)")
    old, new = length
    if not resume:
        raise RunFolderConflict(
            f"{run_dir} holds results of trainer.max_steps={old}; this command asks for "
            f"trainer.max_steps={new}. trainer.resume=true continues the run to step {new} and "
            f"evaluates again. {rerun}")
    if progress_schedule:
        raise RunFolderConflict(
            f"{run_dir}: the curriculum sets τ from t/T with T = trainer.max_steps, and the steps "
            f"already taken used T={old}; continuing to T={new} would follow neither schedule. "
            f"force=true reruns all {new} steps with T={new} (or use another hydra.run.dir).")
    latest = latest_checkpoint(run_dir)
    if latest is not None and latest[0] > int(new):
        raise RunFolderConflict(
            f"{run_dir}: its newest checkpoint is at step {latest[0]}, past trainer.max_steps={new}; "
            f"a resumed run cannot go back. {rerun}")
    stale = tuple(name for name in ("final", "final.tmp", "eval") if name in present)
    start = f"its checkpoint of step {latest[0]}" if latest else "step 0 (no checkpoint)"
    return FolderPlan("continue", stale,
                      f"trainer.max_steps {old} -> {new}: continuing {run_dir} from {start}"
                      + (f"; removed {', '.join(stale)} (made at step {old})" if stale else ""))


def remove_results(run_dir: Path, names: tuple[str, ...]) -> None:
    """Delete ``names`` (files or folders) under ``run_dir``."""
    for name in names:
        path = Path(run_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
