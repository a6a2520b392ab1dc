"""Run discovery for the tables: the run folders under a sweep (``run_info.json`` +
``eval/metrics.json``, optionally ``eval/predictions.jsonl``; the layout is described in
``eval.table``), and the problems met while reading them, kept as notes (never fatal); and one
key of a run's training log (``metrics.jsonl``) by step."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medloc.jsonl import JsonlError, read_jsonl

RUN_INFO_KEYS: tuple[str, ...] = ("dataset", "arm", "seed", "model")


@dataclass(frozen=True)
class Run:
    """One finished, evaluated training run."""

    path: Path
    dataset: str
    arm: str
    seed: int
    model: str
    metrics: dict[str, Any]

    @property
    def cell(self) -> tuple[str, str, str]:
        return (self.dataset, self.model, self.arm)


@dataclass
class Sweep:
    """All runs found under a sweep folder, with the problems met while reading them."""

    root: Path
    runs: list[Run]
    notes: list[str] = field(default_factory=list)
    _ious: dict[Path, dict[str, float] | None] = field(default_factory=dict, repr=False)

    def select(self, dataset: str, model: str | None, arm: str) -> list[Run]:
        """Runs of one dataset (and model, unless None) and arm, by seed."""
        return sorted((run for run in self.runs if run.dataset == dataset and run.arm == arm
                       and (model is None or run.model == model)), key=lambda r: r.seed)

    def sample_ious(self, run: Run) -> dict[str, float] | None:
        """``id -> IoU`` from the run's ``eval/predictions.jsonl``; None if absent or unreadable."""
        if run.path not in self._ious:
            self._ious[run.path] = self._read_ious(run)
        return self._ious[run.path]

    def _read_ious(self, run: Run) -> dict[str, float] | None:
        path = run.path / "eval" / "predictions.jsonl"
        if not path.is_file():
            return None
        try:
            rows = read_jsonl(path)
        except JsonlError as err:
            self._skip_ious(err.where, err.problem)
            return None
        out: dict[str, float] = {}
        for line_no, rec in rows:
            try:
                iou = rec["iou"]
                out[str(rec["id"])] = 0.0 if iou is None else float(iou)
            except (KeyError, TypeError, ValueError) as err:
                self._skip_ious(f"{path}:{line_no}", repr(err))
                return None
        return out

    def _skip_ious(self, where: str, problem: str) -> None:
        self.notes.append(f"{where}: unreadable prediction line ({problem}); "
                          "per-sample test skipped for this run")


def discover_runs(sweep_dir: str | Path) -> Sweep:
    """Find every run folder under ``sweep_dir`` (the layout: ``eval.table``'s docstring)."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"sweep folder {root} does not exist")
    runs: list[Run] = []
    notes: list[str] = []
    seen: dict[tuple[str, str, str, int], Path] = {}
    for info_path in sorted(root.rglob("run_info.json")):
        run_dir = info_path.parent
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
            missing = [k for k in RUN_INFO_KEYS if k not in info]
            if missing:
                raise ValueError(f"missing keys {missing}")
            if not isinstance(info["seed"], int) or isinstance(info["seed"], bool):
                raise ValueError(f"'seed' must be an integer, got {info['seed']!r}")  # noqa: TRY004
            if not info["arm"]:
                raise ValueError("no arm (a run composed without arm=...): no table row to fill")
        except (json.JSONDecodeError, ValueError, OSError) as err:
            notes.append(f"{info_path}: unreadable run_info.json ({err}); run ignored")
            continue
        metrics_path = run_dir / "eval" / "metrics.json"
        if not metrics_path.is_file():
            notes.append(f"{run_dir}: no eval/metrics.json (not evaluated yet); run ignored")
            continue
        try:
            metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
            if not isinstance(metrics, dict):
                raise ValueError("not a JSON object")  # noqa: TRY004
        except (json.JSONDecodeError, ValueError, OSError) as err:
            notes.append(f"{metrics_path}: unreadable ({err}); run ignored")
            continue
        run = Run(run_dir, str(info["dataset"]), str(info["arm"]), int(info["seed"]),
                  str(info["model"]), metrics)
        key = (*run.cell, run.seed)
        if key in seen:
            notes.append(f"{run_dir}: same dataset/model/arm/seed as {seen[key]}; "
                         "ignored (the first one is used)")
            continue
        seen[key] = run_dir
        runs.append(run)
    return Sweep(root, runs, notes)


def read_metrics_jsonl(path: str | Path, key: str) -> dict[int, float]:
    """``step -> value`` of one key from a run's ``metrics.jsonl`` (lines without it are skipped).

    A malformed line raises ValueError naming the file and line number. If a step appears twice
    (e.g. a resumed run rewrote it) the last line wins.
    """
    try:
        rows = read_jsonl(path)
    except JsonlError as err:
        raise ValueError(f"{err.where}: malformed metrics line ({err.problem})") from None
    out: dict[int, float] = {}
    for line_no, rec in rows:
        try:
            if key in rec and rec[key] is not None:
                out[int(rec["step"])] = float(rec[key])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}:{line_no}: malformed metrics line ({err!r})") from None
    return out


def pick_run(sweep_dir: str | Path, arm: str, dataset: str | None = None,
             seed: int | None = None, *, needs: str = "ious.jsonl") -> Run:
    """One run of ``arm`` under ``sweep_dir`` that holds ``needs``: the given dataset and seed, or
    the first dataset (by name) and the lowest seed. Raises ValueError naming what the sweep has."""
    sweep = discover_runs(sweep_dir)
    found = sorted((r for r in sweep.runs if r.arm == arm and (dataset is None or r.dataset == dataset)
                    and (seed is None or r.seed == seed) and (r.path / needs).is_file()),
                   key=lambda r: (r.dataset, r.model, r.seed))
    if not found:
        have = sorted({(r.arm, r.dataset, r.seed) for r in sweep.runs if (r.path / needs).is_file()})
        raise ValueError(f"no run of arm={arm!r}" + (f", dataset={dataset!r}" if dataset else "")
                         + (f", seed={seed}" if seed is not None else "")
                         + f" with {needs} under {sweep_dir}; runs with one: "
                         + (", ".join(f"{a}/{d}/s{s}" for a, d, s in have) or "none"))
    return found[0]
