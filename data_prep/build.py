"""Build the dataset a run reads when it is a phantom twin: generate it in the real on-disk layout
(``data_prep.phantoms``), then convert it with the real converter, exactly like real data.

    python -m data_prep.build debug=cpu_tiny                  # the overrides of the run
    python -m data_prep.build experiment=table1_embedded dataset=phantom_heel

The same overrides as ``python -m medloc.train``: the dataset (and the embedded tiny model) that
run would read are built, once, under a file lock. ``medloc`` itself only checks that a prepared
folder is there (``medloc.prepare.require_dataset``); it never imports data_prep. So that a
training or evaluation command builds what it misses, ``conf/config.yaml`` registers
``BuildMissingData`` as a Hydra callback: Hydra calls it before every job of
``python -m medloc.train`` and ``python -m eval.evaluate`` (multirun cells included).
``make prepare`` (``experiments.sweep prepare``) builds the inputs of every table.

A real dataset (no ``dataset.phantom``) is never built here: it is converted by hand with
``python -m data_prep.<kind>`` (README, "Real weights and data").
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from medloc.config import DatasetConfig
from medloc.logging import console
from medloc.prepare import RECIPE, check_phantom_recipe, file_lock, phantom_recipe, require_dataset


def ensure_dataset(ds: DatasetConfig) -> Path:
    """The folder holding ``{split}.jsonl``; generates and converts a phantom twin if missing.

    A missing real dataset is an error naming the converter command (``require_dataset``).
    """
    out = Path(ds.dir)
    needed = [out / f"{ds.train_split}.jsonl", out / f"{ds.eval_split}.jsonl"]
    if all(p.is_file() for p in needed):
        check_phantom_recipe(ds, out)
        return out
    if ds.phantom is None:
        return require_dataset(ds)  # raises, naming the data_prep command
    from data_prep.phantoms import make_phantom

    raw = Path(ds.raw_dir or (out.parent / "raw" / out.name))
    with file_lock(out.with_name(out.name + ".lock")):
        if all(p.is_file() for p in needed):
            return out
        p = ds.phantom
        kinds = list(ds.mix) or [ds.kind]
        for i, kind in enumerate(kinds):
            sub_raw = raw / kind if ds.mix else raw
            sub_out = out / kind if ds.mix else out
            if not (sub_out / f"{ds.train_split}.jsonl").is_file():
                make_phantom(
                    kind, str(sub_raw), n_images=p.n_images, image_size=tuple(p.image_size),
                    preset=p.preset, seed=p.seed + 1000 * i, overwrite=True,
                    size_range=p.size_range, contrast=p.contrast, noise=p.noise,
                )
                convert_raw(kind, ds, sub_raw, sub_out)
        if ds.mix:
            merge_splits(out, kinds, [ds.train_split, ds.eval_split])
        (out / RECIPE).write_text(json.dumps(phantom_recipe(ds), indent=2, sort_keys=True))
    return out


def merge_splits(out: Path, kinds: list[str], splits: list[str]) -> None:
    """Concatenate ``out/<kind>/<split>.jsonl`` into ``out/<split>.jsonl`` (image paths re-based)."""
    from medloc.data.records import read_records, write_records

    for split in dict.fromkeys(splits):
        merged = []
        for kind in kinds:
            for r in read_records(out / kind / f"{split}.jsonl"):
                merged.append(dataclasses.replace(r, image=f"{kind}/{r.image}"))
        write_records(out / f"{split}.jsonl", merged)


def convert_raw(kind: str, ds: DatasetConfig, raw: Path, out: Path) -> None:
    """Run the ``kind`` converter of data_prep (the same code path as real data)."""
    if kind == "ham10000":
        from data_prep.ham10000 import convert

        convert(str(raw), str(out), rule=ds.mask_rule)
    elif kind == "tn3k":
        from data_prep.tn3k import convert

        convert(str(raw), str(out), rule=ds.mask_rule)
    elif kind == "heel":
        from data_prep.heel import convert

        convert(str(raw), str(out), rule=ds.mask_rule)
    else:
        raise ValueError(f"dataset kind {kind!r}: expected ham10000, tn3k or heel")


class BuildMissingData(Callback):
    """Hydra callback (``hydra.callbacks`` in conf/config.yaml): before a job starts, build the
    job's phantom dataset if it is missing. Anything else (a real dataset, a config Hydra accepts
    but the schema checks reject) is left to the job, which reports it with its own message."""

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        from omegaconf import OmegaConf

        ds = OmegaConf.to_object(config.dataset)  # DatasetConfig, checked by __post_init__
        if isinstance(ds, DatasetConfig) and ds.phantom is not None:
            ensure_dataset(ds)


def main(argv: list[str] | None = None) -> int:
    """``python -m data_prep.build [overrides]``: build the model and dataset of that run."""
    from hydra import compose, initialize_config_dir

    from medloc.config import register_configs, to_run_config
    from medloc.prepare import ensure_model

    overrides = list(sys.argv[1:] if argv is None else argv)
    register_configs()
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = to_run_config(compose(config_name="config", overrides=overrides))
    try:
        model = ensure_model(cfg.model)
        data = ensure_dataset(cfg.dataset)
    except (OSError, ValueError) as err:
        console(f"data_prep.build: {err}", err=True)
        return 1
    console(f"model {model}\ndataset {cfg.dataset.name}: {data}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
