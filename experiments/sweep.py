"""Run one paper table end to end: (stand-in) -> Hydra multirun of every cell -> table + plots.

    python -m experiments.sweep table1                       # embedded default, 2 parallel cells
    python -m experiments.sweep table1 --quick 1             # one dataset, one seed
    python -m experiments.sweep criteria --preset paper --data-root /data/medloc --model-dir /data/models
    python -m experiments.sweep table1 --dry-run             # print the commands only
    python -m experiments.sweep table1 -- trainer.max_steps=2   # extra overrides for every run

Each table is one experiment file in experiments/ (``<table>.yaml`` for the paper's setting,
``<table>_embedded.yaml`` for the embedded default) and runs as ONE Hydra multirun:

    python -m medloc.train --multirun experiment=<table>[_embedded] [hydra/launcher=joblib ...]

A cell whose run folder already holds ``eval/metrics.json`` is skipped, so an interrupted sweep
continues where it stopped. The embedded preset first builds (once, cached) the stand-in
checkpoint every cell starts from (experiments/standin.yaml). Then ``eval.table`` builds the table
(Markdown, LaTeX, CSV, with the paper's numbers beside ours) and ``eval.plots`` draws the curves.
On a cluster, pass ``--launcher submitit_slurm`` (plus ``hydra.launcher.*`` overrides after ``--``)
to spread the cells over nodes with the scheduler you already have.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

HERE = Path(__file__).resolve().parent
TABLES = ("table1", "scale", "criteria", "schedule", "decay", "refresh")
Preset = ("embedded", "paper")


def experiment_name(table: str, preset: str) -> str:
    return f"{table}_embedded" if preset == "embedded" else table


def sweep_params(experiment: str) -> dict[str, list[str]]:
    """The ``hydra.sweeper.params`` of an experiment file, following its ``defaults`` chain."""
    cfg = OmegaConf.load(HERE / f"{experiment}.yaml")
    params: dict[str, list[str]] = {}
    for parent in cfg.get("defaults", []):
        if isinstance(parent, str) and parent != "_self_":
            params.update(sweep_params(parent))
    own = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
    params.update({k: str(v).split(",") for k, v in own.items()})
    return params


def run(cmd: list[str], env: dict[str, str], dry_run: bool) -> None:
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    if dry_run:
        return
    subprocess.run(cmd, env=env, check=True)


def model_names(params: dict[str, list[str]], default: str) -> list[str]:
    """Model group names swept (e.g. tiny_1m, tiny_4m), or the preset's default."""
    return params.get("model", [default])


def args_cache_dir(overrides: list[str]) -> str:
    """The cache_dir the runs will use (an override, else the config default)."""
    for o in overrides:
        if o.startswith("cache_dir="):
            return o.split("=", 1)[1]
    return "cache"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("table", choices=(*TABLES, "standin"))
    ap.add_argument("--preset", choices=Preset, default="embedded")
    ap.add_argument("--jobs", type=int, default=2, help="cells run in parallel (one thread each)")
    ap.add_argument("--quick", type=int, default=0, help="1: first dataset and seed only")
    ap.add_argument("--launcher", default=None,
                    help="Hydra launcher: basic, joblib (default when --jobs > 1), submitit_local, "
                         "submitit_slurm")
    ap.add_argument("--runs-dir", default="runs", help="sweeps are written to RUNS_DIR/<experiment>")
    ap.add_argument("--model-dir", default=os.environ.get("MODEL_DIR", "/data/models"))
    ap.add_argument("--data-root", default=None, help="default: cache/data (embedded)")
    ap.add_argument("--sparsity-prompts", type=int, default=64,
                    help="embedded table1: prompts per twin for the zero-shot reward-sparsity probe")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MEDLOC_THREADS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["MODEL_DIR"] = args.model_dir
    py = [sys.executable, "-m", "medloc.train"]
    common = list(extra)
    if args.data_root:
        common.append(f"data_root={args.data_root}")
    t0 = time.time()

    # 1. the stand-in checkpoint(s) of the embedded preset (skipped when already built)
    if args.table == "standin" or args.preset == "embedded":
        exp = experiment_name(args.table, args.preset) if args.table != "standin" else "standin"
        models = ["tiny_1m"] if args.table == "standin" else model_names(sweep_params(exp), "tiny_1m")
        standin_env = {**env, "MEDLOC_THREADS": str(max(1, args.jobs)),
                       "OMP_NUM_THREADS": str(max(1, args.jobs))}
        for m in models:
            print(f"== stand-in pretraining ({m}): SFT on easy phantoms, cached", flush=True)
            run([*py, "experiment=standin", f"model={m}",
                 "hydra.run.dir=${cache_dir}/standin/${model.name}", *common], standin_env,
                args.dry_run)
        if args.table == "standin":
            return 0

    # 2. every cell of the table as one Hydra multirun
    exp = experiment_name(args.table, args.preset)
    params = sweep_params(exp)
    sweep_dir = Path(args.runs_dir) / exp

    # (embedded Table 1) how sparse a binary reward is at the start, per twin: the paper's symptom
    if args.preset == "embedded" and args.table == "table1" and args.sparsity_prompts > 0:
        datasets = params.get("dataset", [])[: 1 if args.quick else None]
        for ds in datasets:
            out = sweep_dir / f"sparsity_{ds}.json"
            if out.is_file():
                continue
            ckpt = f"{args_cache_dir(common)}/standin/tiny-1m/final"
            run([sys.executable, "-m", "experiments.sparsity", "--checkpoint", ckpt,
                 "--prompts", str(args.sparsity_prompts), "--out", str(out),
                 f"experiment={exp}", f"dataset={ds}", *common],
                {**env, "MEDLOC_THREADS": str(max(1, args.jobs))}, args.dry_run)
    cmd = [*py, "--multirun", f"experiment={exp}", f"hydra.sweep.dir={sweep_dir}"]
    if args.preset == "paper":
        cmd.append("preset=paper")
    if args.quick:
        for key in ("dataset", "seed"):
            if key in params:
                cmd.append(f"hydra.sweeper.params.{key}={params[key][0]}")
    launcher = args.launcher or ("joblib" if args.jobs > 1 else "basic")
    if launcher != "basic":
        cmd.append(f"hydra/launcher={launcher}")
    if launcher == "joblib":
        cmd.append(f"hydra.launcher.n_jobs={args.jobs}")
    n_cells = 1
    for key, values in params.items():
        if not (args.quick and key in ("dataset", "seed")):
            n_cells *= len(values)
    print(f"== {exp}: {n_cells} cells, {args.jobs} in parallel, into {sweep_dir}", flush=True)
    run([*cmd, *common], env, args.dry_run)

    # 3. the table and the plots
    run([sys.executable, "-m", "eval.table", str(sweep_dir), "--table", args.table], env,
        args.dry_run)
    run([sys.executable, "-m", "experiments.plots", str(sweep_dir)], env, args.dry_run)
    print(f"== done in {(time.time() - t0) / 60:.1f} min: {sweep_dir}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
