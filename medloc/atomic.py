"""Atomic writes: a reader (or a resumed run) sees the old file or the complete new one, never a
partial write. Light on imports on purpose: data preparation, training and evaluation all use it.

- ``atomic_write_text`` / ``write_json_atomic``: one text or JSON file;
- ``atomic_write_files``: several text files, all or nothing;
- ``atomic_write_with``: a file some library writes itself (``fig.savefig(path)``);
- ``atomic_directory``: a folder built in a temp sibling and swapped in when complete
  (``atomic_directory_swap`` is that last step alone).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

StrPath = str | os.PathLike[str]


def _temp_beside(path: str) -> tuple[int, str]:
    """An open temp file in ``path``'s folder (created if missing): ``(fd, temp path)``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    return tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=folder)


def atomic_write_files(files: Mapping[StrPath, str]) -> None:
    """Write several text files all-or-nothing.

    Every file is first written in full (fsync'd) to a temp file beside its target; only when all
    temp files exist are they renamed into place (``os.replace`` each). If anything fails before
    the renames, the temp files are removed and no target is touched.
    """
    temps: list[tuple[str, str]] = []
    try:
        for path, text in files.items():
            path = os.fspath(path)
            fd, tmp = _temp_beside(path)
            temps.append((tmp, path))
            with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are ordinary readable files
    except BaseException:
        for tmp, _ in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise
    for tmp, path in temps:
        os.replace(tmp, path)


def atomic_write_text(path: StrPath, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same folder, fsync, then ``os.replace``."""
    atomic_write_files({path: text})


def write_json_atomic(
    path: StrPath, obj: Any, *, sort_keys: bool = True, ensure_ascii: bool = True
) -> None:
    """Pretty JSON (NaN allowed, as Python writes it) written atomically to ``path``."""
    text = json.dumps(obj, indent=2, sort_keys=sort_keys, ensure_ascii=ensure_ascii, allow_nan=True)
    atomic_write_text(path, text + "\n")


def atomic_write_with(path: StrPath, write: Callable[[str], None]) -> None:
    """``write(temp_path)`` writes the file (e.g. ``fig.savefig``); then it replaces ``path``.

    The temp path keeps ``path``'s suffix, so writers that pick a format by suffix still work.
    """
    path = os.fspath(path)
    fd, tmp = _temp_beside(path)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_directory_swap(tmp: Path, final: Path) -> None:
    """Move a fully written folder ``tmp`` to ``final``, replacing an older ``final``."""
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


@contextmanager
def atomic_directory(final: StrPath) -> Iterator[Path]:
    """Yield an empty temp folder beside ``final``; when the block ends without error it replaces
    ``final`` (``atomic_directory_swap``), on error it is removed and ``final`` is untouched.

    Every folder and file in it then gets the permissions ``mkdir``/``open`` give under the umask
    (``mkdtemp`` creates the folder 0700, and some writers, e.g. safetensors, create files 0600).
    """
    final = Path(os.path.abspath(final))
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield tmp
        _make_ordinary(tmp)
        atomic_directory_swap(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _make_ordinary(folder: Path) -> None:
    """Folders ``0o777 & ~umask``, files ``0o666 & ~umask``, below and including ``folder``."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for parent, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(parent, name), 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(parent, name), 0o666 & ~umask)
