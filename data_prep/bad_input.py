"""Bad input of the dataset converters: what is wrong with which source file, reported all at once.

Bad input
---------
Converters check every sample, collect every offender as ``BadInput(file, reason)`` and then
either raise one ``BadInputError`` listing them all (nothing is written) or, with ``--skip-bad``,
leave those samples out and list them under ``"skipped"`` in the manifest. Problems that make the
conversion impossible (no source, unreadable annotation file, ``--out`` naming a file, an empty
source, nothing left after skipping) are ``fatal``: ``--skip-bad`` cannot skip them. Things the
user should know that do not change any box (a CSV read as cp1252, files that match no sample)
are warnings: a ``ConverterWarning`` and the manifest's ``"warnings"`` list. Outputs are written
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class BadInput:
    """One offending input: the file (or ``file:line``) and what is wrong with it."""

    file: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"file": self.file, "reason": self.reason}


class BadInputError(ValueError):
    """Raised by a converter when input is bad; ``offenders`` lists every problem found.

    ``notes`` are warnings collected before the failure (shown after the offenders); ``total``
    is how many samples were checked (None: unknown), so that a file where every one is bad does
    not suggest --skip-bad, which would leave nothing."""

    def __init__(
        self,
        dataset: str,
        offenders: Sequence[BadInput],
        *,
        fatal: bool = False,
        notes: Sequence[BadInput] = (),
        total: int | None = None,
    ) -> None:
        self.dataset = dataset
        self.offenders = list(offenders)
        self.fatal = fatal
        self.notes = list(notes)
        super().__init__(format_bad_inputs(dataset, self.offenders, fatal=fatal, notes=self.notes,
                                           total=total))


SHOWN_PER_KIND = 3  # offending files/rows named per kind of problem


def format_bad_inputs(
    dataset: str,
    offenders: Sequence[BadInput],
    *,
    fatal: bool = False,
    notes: Sequence[BadInput] = (),
    total: int | None = None,
) -> str:
    """The one summary a user reads: one line per kind of problem (the same reason), with how
    many samples have it and the first of them; a reason met once names its file."""
    kinds: dict[str, list[str]] = {}
    for b in offenders:
        kinds.setdefault(b.reason, []).append(b.file)
    lines = [f"{dataset}: {len(offenders)} bad input(s)"
             + (f" of {total} checked" if total is not None else "")
             + (f", {len(kinds)} kind(s) of problem" if len(kinds) < len(offenders) else "")
             + "; nothing was written:"]
    for reason, files in kinds.items():
        if len(files) == 1:
            lines.append(f"  - {files[0]}: {reason}")
        else:
            shown = ", ".join(files[:SHOWN_PER_KIND])
            more = f" and {len(files) - SHOWN_PER_KIND} more" if len(files) > SHOWN_PER_KIND else ""
            lines.append(f"  - {len(files)} x {reason}\n      ({shown}{more})")
    if fatal:
        lines.append("These problems make the conversion impossible; --skip-bad cannot skip them.")
    elif total is not None and len(offenders) >= total:
        lines.append("Every sample is bad: fix the input (--skip-bad would leave nothing).")
    else:
        lines.append(
            "Fix them, or pass --skip-bad to leave these samples out (listed in the manifest)."
        )
    if notes:
        lines.append(f"Also noted ({len(notes)} warning(s)):")
        lines += [f"  - {b.file}: {b.reason}" for b in notes]
    return "\n".join(lines)


def check_bad_inputs(
    dataset: str, bad: Sequence[BadInput], *, skip_bad: bool, notes: Sequence[BadInput] = (),
    total: int | None = None,
) -> None:
    """Raise ``BadInputError`` if there is bad input and skipping was not asked for (``total``:
    how many samples were checked, for the message)."""
    if bad and not skip_bad:
        raise BadInputError(dataset, bad, notes=notes, total=total)


def fatal(dataset: str, file: str, reason: str, notes: Sequence[BadInput] = ()) -> BadInputError:
    """A fatal ``BadInputError`` about one file (raise the returned exception)."""
    return BadInputError(dataset, [BadInput(file, reason)], fatal=True, notes=notes)


class ConverterWarning(UserWarning):
    """Something the user should know that changes no box (the CLI prints it to stderr)."""


def format_warnings(dataset: str, notes: Sequence[BadInput]) -> str:
    lines = [f"{dataset}: {len(notes)} warning(s):"]
    lines += [f"  - {b.file}: {b.reason}" for b in notes]
    return "\n".join(lines)


def emit_warnings(dataset: str, notes: Sequence[BadInput]) -> None:
    """Issue one ``ConverterWarning`` listing ``notes`` (nothing when there are none)."""
    if notes:
        warnings.warn(format_warnings(dataset, notes), ConverterWarning, stacklevel=3)


def check_has_records(
    dataset: str, records: Sequence[Any], source: str, skipped: Sequence[BadInput], what: str
) -> None:
    """An empty result is never a success: raise a fatal error naming ``source``."""
    if records:
        return
    if skipped:
        reason = f"no record left: all {len(skipped)} bad sample(s) were skipped ({what})"
    else:
        reason = f"no record: {what}"
    raise fatal(dataset, source, reason)


def check_out_dir(dataset: str, out: str) -> None:
    """``out`` must be a folder or creatable as one: a fatal error naming it otherwise."""
    path = os.path.abspath(out)
    if os.path.exists(path) and not os.path.isdir(path):
        raise fatal(
            dataset,
            out,
            "--out names an existing file; it must be a folder (new or existing) for "
            "<split>.jsonl + manifest.json",
        )
    parent = os.path.dirname(path)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise fatal(
            dataset, out, f"cannot create the output folder: {parent} is a file, not a folder"
        )
