"""Reading JSONL files (one JSON value per line): the one reader every module uses.

``read_jsonl(path)`` returns ``[(line number, value), ...]`` for the non-blank lines; a line that is
not JSON raises ``JsonlError`` naming ``path:line`` and the column, or, with ``bad="skip"``, is
dropped (a metrics file whose last line a kill cut short), or, with ``bad="keep"``, stands in the
list as its ``JsonlError`` (readers that collect every problem before reporting). Lines end at
``\n``, ``\r\n`` or ``\r`` (not at U+2028 and friends, which a JSON string may hold); text that is
not UTF-8 raises ``JsonlError`` naming the file. Writing is ``medloc.atomic`` (whole files) or an
append of ``json.dumps(row) + "\n"`` (``medloc.logging``).
"""

from __future__ import annotations

import json
import os
from typing import Any, Literal

__all__ = ["JsonlError", "read_jsonl"]

BadLine = Literal["raise", "skip", "keep"]


class JsonlError(ValueError):
    """A JSONL file that cannot be read; ``where`` is ``path:line`` (or ``path``)."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem


def read_jsonl(
    path: str | os.PathLike[str], *, text: str | None = None, bad: BadLine = "raise"
) -> list[tuple[int, Any]]:
    """``[(line number from 1, parsed value), ...]`` of the non-blank lines of ``path``.

    Args:
        path: the file (read as UTF-8 unless ``text`` is given; always the name in messages).
        text: the file's content when the caller has already read (and checked) it.
        bad: what a line that is not valid JSON does: ``"raise"`` a ``JsonlError``, ``"skip"``
            it, or ``"keep"`` the ``JsonlError`` in the value's place.
    """
    if bad not in ("raise", "skip", "keep"):
        raise ValueError(f"bad={bad!r}; expected 'raise', 'skip' or 'keep'")
    name = os.fspath(path)
    if text is None:
        try:
            with open(name, encoding="utf-8") as fh:  # \r\n and \r read as \n
                text = fh.read()
        except UnicodeDecodeError as exc:
            raise JsonlError(name, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    out: list[tuple[int, Any]] = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            out.append((lineno, json.loads(line)))
        except json.JSONDecodeError as exc:
            err = JsonlError(f"{name}:{lineno}", f"not valid JSON ({exc.msg} at column {exc.colno})")
            if bad == "raise":
                raise err from None
            if bad == "keep":
                out.append((lineno, err))
    return out
