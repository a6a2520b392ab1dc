"""Make the inputs of a run exist: the embedded tiny model and phantom datasets, built on demand.

Real weights and real datasets are never fetched: a missing model folder without ``build_tiny``
is an error that says how to get the weights (``medloc.models.loading``); a missing real dataset
is an error naming the data_prep command that prepares it.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from medloc.config import DatasetConfig, ModelConfig


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock so parallel sweep cells build a shared cache entry once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_model(model: ModelConfig) -> str:
    """The model folder; builds the embedded tiny model there first if asked and missing."""
    path = Path(model.path)
    if model.build_tiny and not (path / "config.json").is_file():
        from medloc.models.tiny import build_tiny_model

        with file_lock(path.with_name(path.name + ".lock")):
            if not (path / "config.json").is_file():
                build_tiny_model(path, size=model.build_tiny)
    from medloc.models.loading import resolve_model_path

    return str(resolve_model_path(path))


def ensure_dataset(ds: DatasetConfig) -> Path:
    """The folder holding ``{split}.jsonl``; generates and converts a phantom twin if missing."""
    out = Path(ds.dir)
    needed = [out / f"{ds.train_split}.jsonl", out / f"{ds.eval_split}.jsonl"]
    if all(p.is_file() for p in needed):
        check_phantom_recipe(ds, out)
        return out
    if ds.phantom is None:
        raise FileNotFoundError(
            f"dataset {ds.name!r}: {needed[0]} does not exist. Prepare it from the raw dataset with "
            f"`python -m data_prep.{ds.kind} --src {ds.raw_dir or 'RAW_DIR'} --out {out}` "
            f"(see README, 'Real data')."
        )
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


RECIPE = "medloc_phantom_recipe.json"


def phantom_recipe(ds: DatasetConfig) -> dict:
    """Everything that decides a phantom dataset's content."""
    return {"kind": ds.kind, "mix": list(ds.mix), "phantom": dataclasses.asdict(ds.phantom)}


def check_phantom_recipe(ds: DatasetConfig, out: Path) -> None:
    """A phantom folder made with other parameters must not be reused silently."""
    if ds.phantom is None or not (out / RECIPE).is_file():
        return
    found = json.loads((out / RECIPE).read_text())
    wanted = json.loads(json.dumps(phantom_recipe(ds)))
    if found != wanted:
        raise FileExistsError(
            f"{out} holds a phantom dataset made with {found}, but this run asks for {wanted}. "
            f"Delete the folder (it is regenerated on demand) or point dataset.dir elsewhere."
        )


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


def set_threads(n: int | None = None) -> None:
    """One BLAS/torch thread per process unless MEDLOC_THREADS says otherwise."""
    import torch

    n = n or int(os.environ.get("MEDLOC_THREADS", "0") or 0)
    if n > 0:
        torch.set_num_threads(n)
