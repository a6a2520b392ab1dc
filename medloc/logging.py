"""Console output and rank-0 metric sinks.

- ``console(msg)``: every message the library and the commands show (progress, notes, errors,
  and a command's own result on stdout) goes through it: stdout, or stderr with ``err=True``,
  flushed at once so lines of both streams and of several processes keep their order. Under a
  Hydra job (``python -m medloc.train``) the same lines also go, as printed, to the job's log file
  (``<run dir>/train.log``: every ``logging.FileHandler`` of the root logger, which is where
  Hydra's job logging writes), so the run folder keeps its console.
- ``MetricsLogger``: ``metrics.jsonl`` always, wandb when asked (offline by default), and a
  console progress line with step, τ, reward and ETA. Other ranks get a logger that does nothing.
  The progress line numbers steps as ``metrics.jsonl`` does (``step 0`` is the first step) and
  counts them after it: ``step 0 (1/4)``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any


def console(msg: str = "", *, err: bool = False, end: str = "\n") -> None:
    """Write ``msg + end`` to stdout (``err=True``: stderr) and flush; also to the job's log files
    (``log_files``)."""
    stream = sys.stderr if err else sys.stdout  # looked up now: tests and callers redirect them
    stream.write(msg + end)
    stream.flush()
    for handler in log_files():
        try:
            with handler.lock or contextlib.nullcontext():
                if handler.stream is None:  # FileHandler(delay=True) opens on first use
                    handler.stream = handler._open()
                handler.stream.write(msg + end)
                handler.flush()
        except (OSError, ValueError):  # a closed or vanished log file never stops the run
            continue


def log_files() -> list[logging.FileHandler]:
    """The root logger's file handlers: Hydra's ``<run dir>/train.log`` under ``medloc.train``
    (its job logging), none in a plain Python process or on ranks > 0 (job logging disabled)."""
    return [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; null means "not available" (e.g. window not yet full)
    return value


class MetricsLogger:
    """Append one JSON line per step to ``<run_dir>/metrics.jsonl`` (+ wandb, + console)."""

    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool,
        max_steps: int,
        backend: str = "jsonl",
        wandb_mode: str = "offline",
        project: str = "medloc",
        run_name: str = "",
        config: dict[str, Any] | None = None,
        progress: bool = True,
        start_step: int = 0,
    ):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.samples_path = Path(run_dir) / "samples.jsonl"
        self.max_steps = max_steps
        self.progress = progress and enabled
        self.run_name = run_name
        self._t0 = time.time()
        self._start_step = start_step
        self._wandb = None
        if enabled and backend == "wandb":
            import wandb

            self._wandb = wandb.init(
                project=project, name=run_name or None, dir=str(run_dir), mode=wandb_mode,
                config=config, resume="allow",
            )

    def start(self, step: int) -> None:
        """Measure the ETA from now and from ``step`` (the first step of this process, e.g. after a resume)."""
        self._t0 = time.time()
        self._start_step = step

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _clean(v) for k, v in sorted(metrics.items())}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if v is not None}, step=step)
        if self.progress:
            self._print_progress(step, metrics)

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        if not self.enabled:
            return
        with open(self.samples_path, "a") as f:
            f.writelines(json.dumps({"step": step, **row}) + "\n" for row in rows)

    def _print_progress(self, step: int, m: dict[str, Any]) -> None:
        done = step + 1 - self._start_step
        elapsed = time.time() - self._t0
        left = max(0, self.max_steps - step - 1)
        eta = elapsed / max(done, 1) * left
        # "step" as metrics.jsonl numbers it (0 = the first step), then how many of max_steps
        # are done once it ends.
        where = f"step {step} ({step + 1}/{self.max_steps})"
        parts = [f"[{self.run_name}] {where}" if self.run_name else where]
        for key, label, fmt in [
            ("curriculum/tau", "tau", "{:.2f}"),
            ("reward/mean", "reward", "{:.3f}"),
            ("reward/dead_group_frac", "dead", "{:.2f}"),
            ("loss/total", "loss", "{:.4f}"),
            ("loss/sft", "loss", "{:.4f}"),
            ("loss/kl", "kl", "{:.4f}"),
        ]:
            v = m.get(key)
            if isinstance(v, (int, float)) and math.isfinite(v):
                parts.append(f"{label} " + fmt.format(v))
        parts.append(f"{m.get('time/step_s', 0.0):.2f}s/step ETA {eta / 60:.1f} min")
        console(" | ".join(parts), err=True)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
