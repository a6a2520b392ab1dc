"""Run one paper table end to end: (stand-in) -> Hydra multirun of every cell -> table + plots.

    python -m experiments.sweep table1                       # embedded default, 2 parallel cells
    python -m experiments.sweep table1 --quick 1             # one dataset, one seed
    python -m experiments.sweep criteria --preset paper --data-root /data/medloc --model-dir /data/models
    python -m experiments.sweep ablations                    # criteria+schedule+decay+refresh, one sweep
    python -m experiments.sweep beyond                       # calibrated curriculum, hybrid and band rewards
    python -m experiments.sweep table1 --dry-run             # run nothing; print each command
    python -m experiments.sweep table1 -- trainer.max_steps=2   # extra overrides for every run
    python -m experiments.sweep prepare                      # only build every table's inputs
    python -m experiments.sweep prepare --preset paper --data-root /data/medloc   # check them
    python -m experiments.sweep prepare --preset paper --tables table1            # one table's

Each table is one experiment file in experiments/ (``<table>.yaml`` for the paper's setting,
``<table>_embedded.yaml`` for the embedded default) and runs as ONE Hydra multirun:

    python -m medloc.train --multirun experiment=<table>[_embedded] [hydra/launcher=joblib ...]

Cells run with ``trainer.resume=true``, so an interrupted sweep continues where it stopped: a cell
whose folder holds the finished results of the same configuration is skipped, an unfinished one
continues from its newest checkpoint. A folder made with another configuration stops the sweep,
naming the keys that differ (``-- force=true`` reruns; see ``medloc.train``). The embedded preset
first builds (once, cached) the stand-in checkpoint every cell starts from
(experiments/standin.yaml). Then ``eval.table`` builds the table
(Markdown, LaTeX, CSV, with the paper's numbers beside ours) and ``eval.plots`` draws the curves;
for an ablation table ``eval.replay_panel`` then replays every arm's threshold schedule on the IoUs
the full rule's runs recorded (which decisions each check or refresh rule changes, no training).
``beyond`` (docs/beyond.md) first probes the starting model on each dataset (``experiments.sparsity``)
and calibrates a curriculum from the probe (``medloc.curriculum.calibrate``, into
``SWEEP_DIR/calibration/<dataset>/``, kept for reruns); its ``medloc_calibrated`` cells then run as
one multirun per dataset with the calibrated values as ``curriculum.*`` overrides, beside the
multirun of its other arms.
On a cluster, pass ``--launcher submitit_slurm`` (plus ``hydra.launcher.*`` overrides after ``--``)
to spread the cells over nodes with the scheduler you already have.

``prepare`` runs no cell: with the embedded preset it builds what every table's cells read (the
tiny models, the phantom datasets, the stand-in checkpoints); with the paper preset it checks that
every table's model folders and prepared datasets are there and lists, with the command that
makes each, all that are missing (exit code 1). ``--tables table1`` (``make prepare TABLE=table1``)
limits either to the inputs of those tables' cells.

``--dry-run`` runs and writes nothing: it prints every command with the environment it reads in
front (``MODEL_DIR=... OMP_NUM_THREADS=... python -m ...``) and the data root as an override, so a
copied line reproduces the run. With the paper preset it first checks the table's inputs, as
``prepare`` does, and exits 1 when some are missing (every command is still printed).
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

from medloc.logging import console

HERE = Path(__file__).resolve().parent
ABLATIONS = ("criteria", "schedule", "decay", "refresh")  # + eval.replay_panel after the table
TABLES = ("table1", "scale", *ABLATIONS, "ablations", "beyond")  # ablations: the four above as one sweep
CALIBRATED_ARM = "medloc_calibrated"  # beyond: its curriculum comes from calibrate_dataset
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


SHOWN_ENV = ("MODEL_DIR", "OMP_NUM_THREADS")  # the environment a cell reads (model paths, threads)


def shell_line(cmd: list[str], env: dict[str, str]) -> str:
    """``cmd`` as a shell line that reproduces it: the environment it reads in front
    (``MODEL_DIR=... OMP_NUM_THREADS=... python -m ...``), every word quoted."""
    prefix = [f"{k}={shlex.quote(env[k])}" for k in SHOWN_ENV if k in env]
    return " ".join([*prefix, *(shlex.quote(c) for c in cmd)])


def run(cmd: list[str], env: dict[str, str], dry_run: bool) -> None:
    console("$ " + shell_line(cmd, env))
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


def resume_override(overrides: list[str]) -> list[str]:
    """``trainer.resume=true`` unless the user's overrides set trainer.resume themselves."""
    if any(o.lstrip("+~").startswith("trainer.resume=") for o in overrides):
        return []
    return ["trainer.resume=true"]


def compose_run(overrides: list[str]):
    """The RunConfig of ``python -m medloc.train OVERRIDES`` (Hydra's own keys left out)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from medloc.config import register_configs, to_run_config

    register_configs()
    GlobalHydra.instance().clear()
    own = [o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))]
    with initialize_config_dir(config_dir=str(HERE.parent / "conf"), version_base="1.3"):
        return to_run_config(compose(config_name="config", overrides=own))


def table_inputs(preset: str, common: list[str], quick: bool,
                 tables: tuple[str, ...] = TABLES) -> tuple[dict, dict]:
    """{model path: ModelConfig}, {dataset dir: DatasetConfig} of every cell of ``tables``."""
    models, datasets = {}, {}
    for table in tables:
        exp = experiment_name(table, preset)
        params = sweep_params(exp)
        for ds in params.get("dataset", [None])[: 1 if quick else None]:
            for model in params.get("model", [None]):
                cfg = compose_run([f"experiment={exp}", *(["preset=paper"] * (preset == "paper")),
                                   *([f"dataset={ds}"] if ds else []),
                                   *([f"model={model}"] if model else []), *common])
                models.setdefault(cfg.model.path, cfg.model)
                datasets.setdefault(cfg.dataset.dir, cfg.dataset)
    return models, datasets


def prepare(args: argparse.Namespace, common: list[str], env: dict[str, str], py: list[str]) -> int:
    """Build (embedded) or check (paper) every table's inputs; see the module docstring."""
    from data_prep.build import ensure_dataset
    from medloc.prepare import ensure_model

    os.environ["MODEL_DIR"] = args.model_dir  # what the runs will see (model paths use it)
    tables = selected_tables(args.tables)
    console(f"== prepare ({args.preset}): the inputs of {', '.join(tables)}")
    models, datasets = table_inputs(args.preset, common, bool(args.quick), tables)
    verb = "build" if args.preset == "embedded" else "check"
    problems = []
    for what, items, ensure in [("model", models, ensure_model), ("dataset", datasets, ensure_dataset)]:
        for where, item in items.items():
            console(f"== {verb} {what} {where}")
            if args.dry_run and args.preset == "embedded":  # a check (paper) builds nothing
                continue
            try:
                ensure(item)
            except (OSError, ValueError) as err:  # missing folders, a phantom made otherwise
                problems.append(f"{what} {where}: {err}")
    if args.preset == "embedded":
        names = sorted({m for t in tables for m in model_names(
            sweep_params(experiment_name(t, args.preset)), "tiny_1m")})
        for m in names:
            console(f"== stand-in pretraining ({m}): SFT on easy phantoms, cached")
            run(standin_command(py, m, common), standin_env(env, args.jobs), args.dry_run)
    if problems:
        console(f"\n{len(problems)} input(s) missing or unusable:", err=True)
        for p in problems:
            console(f"- {p}", err=True)
        return 1
    console(f"== prepare ({args.preset}): {len(models)} model(s), {len(datasets)} dataset(s) "
            + ("listed (dry run)" if args.dry_run else "ready"))
    return 0


def selected_tables(spec: str | None) -> tuple[str, ...]:
    """``--tables table1,scale`` -> those tables (each checked); none given -> every table."""
    if not spec:
        return TABLES
    tables = tuple(t.strip() for t in spec.split(",") if t.strip())
    unknown = [t for t in tables if t not in TABLES]
    if unknown:
        raise SystemExit(f"--tables {spec}: unknown table(s) {unknown}; choose from {list(TABLES)}")
    return tables


def standin_command(py: list[str], model: str, common: list[str]) -> list[str]:
    return [*py, "experiment=standin", f"model={model}",
            "hydra.run.dir=${cache_dir}/standin/${model.name}", *common, *resume_override(common)]


def standin_env(env: dict[str, str], jobs: int) -> dict[str, str]:
    """The stand-in runs alone: it may use every thread the cells would."""
    n = str(max(1, jobs))
    return {**env, "OMP_NUM_THREADS": n}


def calibrate_dataset(args: argparse.Namespace, exp: str, dataset: str, sweep_dir: Path,
                      common: list[str], env: dict[str, str]) -> list[str]:
    """beyond: probe the starting model on ``dataset`` and calibrate a curriculum from the probe
    (both cached under SWEEP_DIR/calibration/<dataset>/); the ``curriculum.*`` overrides that load
    it into the calibrated arm's cells. A dry run prints the two commands and a placeholder."""
    from medloc.curriculum.calibrate import overrides_for

    folder = sweep_dir / "calibration" / dataset
    probe, node = folder / "probe.json", folder / "curriculum.yaml"
    preset = ["preset=paper"] * (args.preset == "paper")
    cfg = compose_run([f"experiment={exp}", *preset, f"dataset={dataset}", f"arm={CALIBRATED_ARM}",
                       *common])
    checkpoint = cfg.init_from or cfg.model.path  # the model the cells start from
    t0 = time.time()
    if not probe.is_file():
        run([sys.executable, "-m", "experiments.sparsity", "--checkpoint", checkpoint,
             "--prompts", str(args.sparsity_prompts), "--out", str(probe), f"experiment={exp}",
             *preset, f"dataset={dataset}", f"arm={CALIBRATED_ARM}", *common],
            {**env, "OMP_NUM_THREADS": str(max(1, args.jobs))}, args.dry_run)
    if not node.is_file():
        run([sys.executable, "-m", "medloc.curriculum.calibrate", "--probe", str(probe),
             "--out", str(node)], env, args.dry_run)
    if args.dry_run:
        return [f"<curriculum.* from {node}>"]
    console(f"== calibration of {dataset}: {time.time() - t0:.0f} s (probe + calibrate; 0 when cached)")
    from omegaconf import OmegaConf

    return overrides_for(OmegaConf.to_container(OmegaConf.load(node), resolve=True))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("table", choices=(*TABLES, "standin", "prepare"),
                    help="a table to reproduce; standin: only the embedded stand-in checkpoint; "
                         "prepare: only build (embedded) or check (paper) every table's inputs; "
                         "beyond: the calibrated curriculum and the hybrid and band rewards")
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
                    help="prompts per twin for the zero-shot reward-sparsity probe (embedded "
                         "table1) and for the calibration probe (beyond)")
    ap.add_argument("--tables", default=None,
                    help="prepare: only these tables' inputs (comma list, e.g. table1); "
                         "default: every table")
    ap.add_argument("--dry-run", action="store_true",
                    help="run nothing: print each command (with the environment it reads) as it "
                         "would run; the paper preset still checks the table's inputs")
    args = ap.parse_args(argv)

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["MODEL_DIR"] = args.model_dir
    py = [sys.executable, "-m", "medloc.train"]
    common = list(extra)
    if args.data_root:
        common.append(f"data_root={args.data_root}")
    elif args.preset == "paper" and not any(o.startswith("data_root=") for o in common):
        from medloc.config import RunConfig

        common.append(f"data_root={RunConfig.data_root}")  # explicit in every printed command
    t0 = time.time()
    if args.table == "prepare":
        return prepare(args, common, env, py)
    if args.preset == "paper" and args.table != "standin":
        # the table's model folders and prepared datasets, checked before any cell (also dry)
        # (a dry run lists what is missing and still prints every command, then exits 1)
        check = argparse.Namespace(**{**vars(args), "tables": args.table, "dry_run": False})
        inputs_missing = prepare(check, common, env, py) != 0
        if inputs_missing and not args.dry_run:
            return 1
    else:
        inputs_missing = False

    # 1. the stand-in checkpoint(s) of the embedded preset (skipped when already built)
    if args.table == "standin" or args.preset == "embedded":
        exp = experiment_name(args.table, args.preset) if args.table != "standin" else "standin"
        models = ["tiny_1m"] if args.table == "standin" else model_names(sweep_params(exp), "tiny_1m")
        for m in models:
            console(f"== stand-in pretraining ({m}): SFT on easy phantoms, cached")
            run(standin_command(py, m, common), standin_env(env, args.jobs), args.dry_run)
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
                {**env, "OMP_NUM_THREADS": str(max(1, args.jobs))}, args.dry_run)
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
    console(f"== {exp}: {n_cells} cells, {args.jobs} in parallel, into {sweep_dir}")
    if args.table == "beyond":
        # (beyond) each dataset's calibration first; its calibrated cells run as their own
        # multirun with the calibrated values as overrides, the other arms as one multirun
        datasets = params["dataset"][: 1 if args.quick else None]
        calibrated = {ds: calibrate_dataset(args, exp, ds, sweep_dir, common, env) for ds in datasets}
        others = ",".join(a for a in params["arm"] if a != CALIBRATED_ARM)
        run([*cmd, f"hydra.sweeper.params.arm='{others}'", *common, *resume_override(common)], env,
            args.dry_run)
        for ds, overrides in calibrated.items():
            base = [c for c in cmd if not c.startswith("hydra.sweeper.params.dataset=")]
            run([*base, f"hydra.sweeper.params.arm={CALIBRATED_ARM}",
                 f"hydra.sweeper.params.dataset={ds}", *overrides, *common,
                 *resume_override(common)], env, args.dry_run)
    else:
        run([*cmd, *common, *resume_override(common)], env, args.dry_run)

    # 3. the table(s) and the plots; an ablation table gets its replay panel: each arm's rule
    #    replayed on the full rule's recorded IoUs
    tables = ABLATIONS if args.table == "ablations" else (args.table,)
    for table in tables:
        run([sys.executable, "-m", "eval.table", str(sweep_dir), "--table", table], env,
            args.dry_run)
    run([sys.executable, "-m", "experiments.plots", str(sweep_dir)], env, args.dry_run)
    for table in tables:
        if table in ABLATIONS:
            run([sys.executable, "-m", "eval.replay_panel", str(sweep_dir), "--table", table],
                env, args.dry_run)
    if args.dry_run:
        console(f"== dry run: nothing ran, nothing was written; the commands above (each with the "
                f"environment it reads) reproduce the sweep into {sweep_dir}"
                + ("; its inputs are missing (listed above)" if inputs_missing else ""))
        return int(inputs_missing)
    else:
        console(f"== done in {(time.time() - t0) / 60:.1f} min: {sweep_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
