"""Completion text -> parsed answer (box or None, plus format flags). Never raises (PAPER.md §1).

The policy is asked to write ``<think> ... </think><answer> ... </answer>``. Two answer bodies
are understood, whatever ``answer_format`` is (the box is extracted from either):

- the VLM-R1 JSON object ``{"bbox_2d": [x1, y1, x2, y2]}`` (other keys such as ``"label"`` are
  allowed and ignored: Qwen2.5-VL's native grounding answer carries one);
- a bare list ``[x1, y1, x2, y2]``.

Coordinates may be integers or floats with any surrounding whitespace. Anything else inside
``<answer>`` (prose, several boxes, a list of objects, markdown fences, wrong arity, booleans,
NaN/Infinity, numbers that overflow a float) is a parse failure: ``box is None`` and ``error``
says why. A failure is a miss with reward 0, counted and logged by the caller, never an exception.

``answer_format`` only decides what ``format_ok`` (the format reward) requires:

- ``"vlm_r1_json"`` (the paper): the whole text is ``<think>...</think>``, optional whitespace,
  ``<answer>{"bbox_2d": [4 numbers]}</answer>``, each tag exactly once;
- ``"bare_list"`` (the tiny embedded model's short answer): the whole text is
  ``<answer>[4 numbers]</answer>``, optionally preceded by one ``<think>...</think>`` block.

Implementation note: no regular expressions. Tags are located with ``str.find``/``str.count``
and the body is decoded with ``json.loads``, all linear in the length of the text, so a
multi-megabyte or adversarial completion cannot stall a training step.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Literal, get_args

AnswerFormat = Literal["vlm_r1_json", "bare_list"]

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"

__all__ = ["AnswerFormat", "ParsedAnswer", "parse_completion"]


@dataclass(frozen=True)
class ParsedAnswer:
    """Result of parsing one completion.

    box: ``(x1, y1, x2, y2)`` in the frame the model answered in (model-input pixels), or None.
    has_think: a ``<think>`` tag is followed somewhere by ``</think>``.
    has_answer: an ``<answer>`` tag is followed somewhere by ``</answer>``.
    format_ok: the whole text has the structure ``answer_format`` requires (see module doc).
    error: None when a box was found and the format is ok; otherwise the first problem found
        (box problems first, then format problems), as a short human-readable reason.
    """

    box: tuple[float, float, float, float] | None
    has_think: bool
    has_answer: bool
    format_ok: bool
    error: str | None


class _BadBody(ValueError):
    """Internal: the answer body is not one of the two accepted forms."""


def _reject_constant(name: str) -> float:
    # json.loads calls this for NaN, Infinity and -Infinity, which are not coordinates.
    raise _BadBody(f"non-finite coordinate {name}")


def _coords(values: object) -> tuple[float, float, float, float]:
    """A JSON list of exactly four finite numbers (ints or floats, not bools) -> 4 floats."""
    if not isinstance(values, list):
        raise _BadBody(f"expected a list of 4 numbers, got {type(values).__name__}")
    if len(values) != 4:
        raise _BadBody(f"expected 4 coordinates, got {len(values)}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _BadBody(f"coordinate {v!r} is not a number")
        try:
            f = float(v)
        except OverflowError:  # an integer literal too large for a float
            raise _BadBody("coordinate overflows a float") from None
        if not math.isfinite(f):
            raise _BadBody("non-finite coordinate")
        out.append(f)
    return (out[0], out[1], out[2], out[3])


def _parse_body(body: str) -> tuple[tuple[float, float, float, float], AnswerFormat]:
    """Decode an ``<answer>`` body; return the box and which form it was written in."""
    text = body.strip()
    if not text:
        raise _BadBody("empty <answer> body")
    if text[0] not in "[{":  # cheap early exit for prose, before json sees it
        raise _BadBody("answer is neither a JSON object nor a list")
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except _BadBody:
        raise
    except (ValueError, RecursionError):  # JSONDecodeError, int-digit limit, deep nesting
        raise _BadBody("answer is not valid JSON") from None
    if isinstance(value, dict):
        if "bbox_2d" not in value:
            raise _BadBody('JSON object has no "bbox_2d" key')
        return _coords(value["bbox_2d"]), "vlm_r1_json"
    return _coords(value), "bare_list"


def _find_pair(text: str, open_tag: str, close_tag: str, start: int = 0) -> tuple[int, int] | None:
    """Index just after the first ``open_tag`` at/after ``start`` and index of the next ``close_tag``."""
    i = text.find(open_tag, start)
    if i < 0:
        return None
    j = text.find(close_tag, i + len(open_tag))
    if j < 0:
        return None
    return i + len(open_tag), j


def _format_problem(text: str, body_form: AnswerFormat | None,
                    answer_format: str) -> str | None:
    """None when ``text`` has exactly the structure ``answer_format`` requires, else the reason."""
    s = text.strip()
    n_think_open, n_think_close = s.count(THINK_OPEN), s.count(THINK_CLOSE)
    if s.count(ANSWER_OPEN) != 1 or s.count(ANSWER_CLOSE) != 1:
        return "format: need exactly one <answer> and one </answer>"
    if not s.endswith(ANSWER_CLOSE):
        return "format: text after </answer>"
    if answer_format == "vlm_r1_json":
        if n_think_open != 1 or n_think_close != 1:
            return "format: need exactly one <think> and one </think>"
        if not s.startswith(THINK_OPEN):
            return "format: text must start with <think>"
        after_think = s[s.find(THINK_CLOSE) + len(THINK_CLOSE):].lstrip()
        if not after_think.startswith(ANSWER_OPEN):
            return "format: <answer> must follow </think>"
        if body_form != "vlm_r1_json":
            return 'format: answer must be a JSON object {"bbox_2d": [x1, y1, x2, y2]}'
        return None
    if answer_format == "bare_list":
        rest = s
        if n_think_open or n_think_close:
            if n_think_open != 1 or n_think_close != 1 or not s.startswith(THINK_OPEN):
                return "format: at most one leading <think>...</think> block"
            rest = s[s.find(THINK_CLOSE) + len(THINK_CLOSE):].lstrip()
        if not rest.startswith(ANSWER_OPEN):
            return "format: text must start with <answer> (after an optional <think> block)"
        if body_form != "bare_list":
            return "format: answer must be a bare list [x1, y1, x2, y2]"
        return None
    raise ValueError(f"unknown answer_format {answer_format!r}; allowed: {get_args(AnswerFormat)}")


def parse_completion(text: str, answer_format: str = "vlm_r1_json") -> ParsedAnswer:
    """Parse one completion; never raises for any ``str`` (PAPER.md §1).

    The box comes from the first ``<answer>`` and the first ``</answer>`` after it, in either
    accepted body form. ``answer_format`` ("vlm_r1_json" | "bare_list") only sets what
    ``format_ok`` requires; an unknown value is a programming error and raises ValueError.
    """
    if answer_format not in get_args(AnswerFormat):
        raise ValueError(f"unknown answer_format {answer_format!r}; allowed: {get_args(AnswerFormat)}")
    if not isinstance(text, str):
        raise TypeError(f"parse_completion expects str, got {type(text).__name__}")

    has_think = _find_pair(text, THINK_OPEN, THINK_CLOSE) is not None
    answer_span = _find_pair(text, ANSWER_OPEN, ANSWER_CLOSE)
    has_answer = answer_span is not None

    box: tuple[float, float, float, float] | None = None
    body_form: AnswerFormat | None = None
    box_error: str | None = None
    if answer_span is None:
        box_error = "no <answer>...</answer> block"
    else:
        try:
            box, body_form = _parse_body(text[answer_span[0]:answer_span[1]])
        except _BadBody as exc:
            box_error = str(exc)

    format_error = _format_problem(text, body_form, answer_format)
    return ParsedAnswer(
        box=box,
        has_think=has_think,
        has_answer=has_answer,
        format_ok=format_error is None,
        error=box_error if box_error is not None else format_error,
    )
