"""Completion text -> parsed answer (box or None, plus format flags). Never raises (docs/method.md §1).

The policy is asked to write ``<think> ... </think><answer> ... </answer>``. Two parsing rules
read the box out of a completion (``reward.parse_rule``, docs/deviations.md, item 7); ``answer_format``
("vlm_r1_json" | "bare_list") is what the prompt asked for and decides what the format reward
(``format_ok``) requires under either rule.

Rule ``"vlm_r1"`` (the default; how VLM-R1's REC rewards read an answer, which MedLoc-R1 builds on)
----------------------------------------------------------------------------------------------------

- The box: take the first ``<answer>`` and the first ``</answer>`` after it (what VLM-R1's
  ``re.search(r"<answer>(.*?)</answer>", text, re.DOTALL)`` finds) and, inside that body, the
  first bracketed list of exactly four numbers, whatever surrounds it::

      [ n , n , n , n ]     n = -?(\\d+ | \\d*.\\d+)     (VLM-R1's ``-?\\d*\\.?\\d+``; whitespace
                                                       allowed around every number)

  So Qwen2.5-VL's native ``[{"bbox_2d": [x1, y1, x2, y2], "label": "…"}]``, a ```` ```json ````
  fence, a bare list and prose ("the lesion is at [12, 30, 80, 95]") all give a box; integers,
  decimals (``.5``, ``12.25``) and a minus sign are read, exponents (``1e3``), ``+1``, ``1.``,
  NaN and lists of 3 or 5 numbers are not lists of four numbers.
- Several boxes: the FIRST list of four numbers in the answer body counts (as VLM-R1's
  ``re.search``); the rest are ignored. ``[[1, 2, 3, 4]]`` reads the inner list.
- No ``<answer>…</answer>`` pair (no tag, or an unclosed one): no box. VLM-R1's IoU reward has no
  fallback there either: when its answer regex does not match, the reward is 0 (unlike its
  free-text accuracy rewards, which fall back to the whole completion). A box written outside the
  answer tags is therefore a miss, as in training there.
- A number too long for a float (``inf`` after conversion) makes the first list unusable: no box
  (the first list still counts; the parser does not go on to a second one).
- The format reward (``format_ok``), following VLM-R1's ``format_reward_rec``
  ``<think>.*?</think>\\s*<answer>.*?\\{.*\\[x1, y1, x2, y2\\].*\\}.*?</answer>`` (searched, not
  anchored: text before ``<think>`` and after ``</answer>`` is allowed):

  - ``vlm_r1_json``: the answer block the box is read from follows ``</think>`` with only
    whitespace between, some ``<think>`` comes before that ``</think>``, and the box list sits
    inside braces in the answer body (a ``{`` before it and a ``}`` after it): the VLM-R1 object
    and Qwen's native list of objects (fenced or not) pass; a bare list or prose does not.
  - ``bare_list`` (the tiny embedded model, prompted without ``<think>``): the same pattern without
    the think block and the braces: ``format_ok`` is exactly "a box was read from an
    ``<answer>…</answer>`` block".

  One number pattern serves both rewards: VLM-R1's format regex happens to want integers with no
  space after ``[`` while its IoU regex reads decimals and minus signs; here the format reward
  accepts the numbers the accuracy reward reads, so ``format_ok`` always implies a box.

Rule ``"strict"`` (the alternative; this repository's earlier parser)
---------------------------------------------------------------------

- The box: the first ``<answer>…</answer>`` body, stripped, must be exactly one JSON value: the
  object ``{"bbox_2d": [x1, y1, x2, y2]}`` (other keys such as ``"label"`` allowed) or a bare list
  ``[x1, y1, x2, y2]``, each coordinate a finite JSON number (not a bool). Prose, several boxes,
  a list of objects (Qwen's native form), markdown fences, wrong arity, NaN/Infinity, numbers that
  overflow a float are all parse failures.
- The format reward requires the whole text (stripped) to be exactly:

  - ``vlm_r1_json``: ``<think>...</think>``, optional whitespace,
    ``<answer>{"bbox_2d": [4 numbers]}</answer>``, each tag exactly once;
  - ``bare_list``: ``<answer>[4 numbers]</answer>``, optionally preceded by one
    ``<think>...</think>`` block.

Both rules: a parse failure is ``box is None`` with ``error`` saying why; it is a miss with reward 0,
counted and logged by the caller, never an exception. Boxes are in the frame the model answered in
(model-input pixels), as written.

Inverted and empty boxes (both rules): a box with ``x2 < x1`` or ``y2 < y1`` is ``box_problem =
"inverted"``, one with no area otherwise (``x2 == x1`` or ``y2 == y1``) is ``"empty"``; the box is
returned as written (it scores IoU 0: a miss) and the flag stands beside it, so that evaluation can
count and name such answers (``medloc.metrics.score_predictions``: ``invalid_box_rate``;
``eval.score`` warns with line numbers).

- ``vlm_r1``: the flag changes nothing else: ``format_ok`` and ``error`` are what they were, as in
  VLM-R1, whose format reward accepts any four numbers (``[110, 220, 10, 20]`` there earns the
  format reward and accuracy 0). Training under this rule (the default, every embedded run) is
  unchanged by the flag.
- ``strict``: such a box is not "a valid box": ``format_ok`` is false and ``error`` says
  ``inverted box ...`` / ``empty box ...`` (the box itself is still returned).

Command line: ``python -m medloc.parsing --rule vlm_r1|strict [--answer-format vlm_r1_json|bare_list]``
reads JSON lines ``{"text": "...", ...}`` on stdin and writes one line
``{..., "box": [x1, y1, x2, y2] | null, "format_ok": true|false, "error": "..." | null,
"box_problem": "inverted" | "empty" | null}`` per input line, whatever the line holds: every input
key other than ``"text"`` (an ``"id"``, ...) is passed through unchanged (an input key named like a
result key is replaced by the result). A line that is not such an object gives ``box: null``,
``format_ok: false`` and the reason in ``error``.

Implementation note: everything is linear in the length of the text, so a multi-megabyte or
adversarial completion cannot stall a training step. Tags are located with ``str.find``; the
strict body is decoded with ``json.loads``; the one regular expression (the list of four numbers)
cannot backtrack catastrophically: every quantified piece (``\\s*``, ``\\d+``) is followed by a
character it cannot match (the character classes of whitespace, digits, ``.``, ``,`` and ``]``
follow one another without overlap), so a failed attempt gives back each character in O(1), and an
attempt starts only at ``[`` and never consumes a ``[``, so attempts do not overlap.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass
from typing import Any, Literal, get_args

AnswerFormat = Literal["vlm_r1_json", "bare_list"]
ParseRule = Literal["vlm_r1", "strict"]
BoxProblem = Literal["inverted", "empty"]

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"

__all__ = ["AnswerFormat", "BoxProblem", "ParseRule", "ParsedAnswer", "box_problem", "main",
           "parse_completion", "parse_json_line"]


@dataclass(frozen=True)
class ParsedAnswer:
    """Result of parsing one completion.

    box: ``(x1, y1, x2, y2)`` in the frame the model answered in (model-input pixels), or None.
    has_think: a ``<think>`` tag is followed somewhere by ``</think>``.
    has_answer: an ``<answer>`` tag is followed somewhere by ``</answer>``.
    format_ok: the text has the structure the rule and ``answer_format`` require (module doc);
        implies ``box is not None``.
    error: None when a box was found and the format is ok; otherwise the first problem found
        (box problems first, then format problems), as a short human-readable reason.
    box_problem: ``"inverted"`` (x2 < x1 or y2 < y1), ``"empty"`` (no area otherwise) or None;
        only with a box (module doc: under ``vlm_r1`` it changes neither ``format_ok`` nor
        ``error``; under ``strict`` it makes ``format_ok`` false).
    """

    box: tuple[float, float, float, float] | None
    has_think: bool
    has_answer: bool
    format_ok: bool
    error: str | None
    box_problem: BoxProblem | None = None


def box_problem(box: tuple[float, float, float, float] | None) -> BoxProblem | None:
    """``"inverted"`` when x2 < x1 or y2 < y1, ``"empty"`` when otherwise x2 == x1 or y2 == y1, else
    None (also for no box)."""
    if box is None:
        return None
    x1, y1, x2, y2 = box
    if x2 < x1 or y2 < y1:
        return "inverted"
    if x2 == x1 or y2 == y1:
        return "empty"
    return None


def _box_problem_reason(box: tuple[float, float, float, float], problem: BoxProblem) -> str:
    shown = "[" + ", ".join(f"{c:g}" for c in box) + "]"
    if problem == "inverted":
        return f"inverted box {shown}: expected x1 <= x2 and y1 <= y2 ([x1, y1, x2, y2], top-left first)"
    return f"empty box {shown}: zero width or height"


def _find_pair(text: str, open_tag: str, close_tag: str, start: int = 0) -> tuple[int, int] | None:
    """Index just after the first ``open_tag`` at/after ``start`` and index of the next ``close_tag``.

    The same span as ``re.search(open + "(.*?)" + close, text, re.DOTALL).span(1)``: if the first
    opening tag has no closing tag after it, no later one has either.
    """
    i = text.find(open_tag, start)
    if i < 0:
        return None
    j = text.find(close_tag, i + len(open_tag))
    if j < 0:
        return None
    return i + len(open_tag), j


# ============================================================================ rule "vlm_r1"
# One number: VLM-R1's -?\d*\.?\d+ written without its ambiguity (\d* then \d+ can split a digit
# run in many ways; this form cannot): an integer, a decimal with digits after the point, or .5.
_NUM = r"-?(?:\d+(?:\.\d+)?|\.\d+)"
_BOX_LIST = re.compile(rf"\[\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\]")


def _parse_vlm_r1(text: str, answer_format: str) -> ParsedAnswer:
    has_think = _find_pair(text, THINK_OPEN, THINK_CLOSE) is not None
    span = _find_pair(text, ANSWER_OPEN, ANSWER_CLOSE)
    if span is None:
        return ParsedAnswer(None, has_think, False, False, "no <answer>...</answer> block")
    body = text[span[0]:span[1]]
    match = _BOX_LIST.search(body)  # the FIRST list of four numbers counts
    if match is None:
        return ParsedAnswer(None, has_think, True, False,
                            "no [x1, y1, x2, y2] list of four numbers in <answer>")
    coords = tuple(float(g) for g in match.groups())  # float() of a \d run never raises
    if not all(math.isfinite(c) for c in coords):  # a digit run too long for a float
        return ParsedAnswer(None, has_think, True, False, "coordinate overflows a float")
    box = (coords[0], coords[1], coords[2], coords[3])

    format_error: str | None = None
    if answer_format == "vlm_r1_json":
        before = text[:span[0] - len(ANSWER_OPEN)].rstrip()
        if not before.endswith(THINK_CLOSE) or before.find(THINK_OPEN, 0, len(before) - len(THINK_CLOSE)) < 0:
            format_error = "format: <answer> must follow <think>...</think> (only whitespace between)"
        elif body.rfind("{", 0, match.start()) < 0 or body.find("}", match.end()) < 0:
            format_error = "format: the box list must sit inside a JSON object {...}"
    elif answer_format == "bare_list":
        pass  # a box read from an <answer>...</answer> block is the whole requirement
    else:
        raise ValueError(f"unknown answer_format {answer_format!r}; allowed: {get_args(AnswerFormat)}")
    return ParsedAnswer(box, has_think, True, format_error is None, format_error, box_problem(box))


# ============================================================================ rule "strict"
class _BadBody(ValueError):
    """Internal: the answer body is not one of the two accepted forms."""


def _reject_constant(name: str) -> float:
    # json.loads calls this for NaN, Infinity and -Infinity, which are not coordinates.
    raise _BadBody(f"non-finite coordinate {name}")


_STRICT_WANTS = ('the strict rule wants the <answer> body to be exactly {"bbox_2d": [x1, y1, x2, y2]} '
                 "or [x1, y1, x2, y2]")


def _coords(values: object) -> tuple[float, float, float, float]:
    """A JSON list of exactly four finite numbers (ints or floats, not bools) -> 4 floats."""
    if not isinstance(values, list):
        raise _BadBody(f"expected a list of 4 numbers, got {type(values).__name__}")
    if values and all(isinstance(v, dict) for v in values):
        raise _BadBody("a list of objects (Qwen2.5-VL's native [{\"bbox_2d\": [...], \"label\": ...}]); "
                       f"{_STRICT_WANTS} (reward.parse_rule=vlm_r1 reads the native form)")
    if len(values) != 4:
        raise _BadBody(f"expected 4 coordinates, got {len(values)}; {_STRICT_WANTS}")
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


def _parse_strict_body(body: str) -> tuple[tuple[float, float, float, float], AnswerFormat]:
    """Decode an ``<answer>`` body; return the box and which form it was written in."""
    text = body.strip()
    if not text:
        raise _BadBody("empty <answer> body")
    if text[0] not in "[{":  # cheap early exit for prose, before json sees it
        raise _BadBody(f"answer is neither a JSON object nor a list; {_STRICT_WANTS}")
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except _BadBody:
        raise
    except (ValueError, RecursionError):  # JSONDecodeError, int-digit limit, deep nesting
        raise _BadBody(f"answer is not valid JSON; {_STRICT_WANTS}") from None
    if isinstance(value, dict):
        if "bbox_2d" not in value:
            raise _BadBody('JSON object has no "bbox_2d" key')
        return _coords(value["bbox_2d"]), "vlm_r1_json"
    return _coords(value), "bare_list"


def _strict_format_problem(text: str, body_form: AnswerFormat | None,
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
    elif answer_format == "bare_list":
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


def _parse_strict(text: str, answer_format: str) -> ParsedAnswer:
    has_think = _find_pair(text, THINK_OPEN, THINK_CLOSE) is not None
    answer_span = _find_pair(text, ANSWER_OPEN, ANSWER_CLOSE)
    box: tuple[float, float, float, float] | None = None
    body_form: AnswerFormat | None = None
    box_error: str | None = None
    if answer_span is None:
        box_error = "no <answer>...</answer> block"
    else:
        try:
            box, body_form = _parse_strict_body(text[answer_span[0]:answer_span[1]])
        except _BadBody as exc:
            box_error = str(exc)
    format_error = _strict_format_problem(text, body_form, answer_format)
    problem = box_problem(box)
    if problem is not None and box is not None and box_error is None:
        box_error = _box_problem_reason(box, problem)  # not a valid box: no format reward
    return ParsedAnswer(
        box=box,
        has_think=has_think,
        has_answer=answer_span is not None,
        format_ok=format_error is None and box_error is None,
        error=box_error if box_error is not None else format_error,
        box_problem=problem,
    )


# ============================================================================ entry points
def parse_completion(text: str, answer_format: str = "vlm_r1_json",
                     parse_rule: str = "vlm_r1") -> ParsedAnswer:
    """Parse one completion under ``parse_rule``; never raises for any ``str`` (docs/method.md §1).

    ``parse_rule`` ("vlm_r1" | "strict", the default of ``reward.parse_rule``) decides how the box is
    read; ``answer_format`` ("vlm_r1_json" | "bare_list") what ``format_ok`` requires (module doc).
    An unknown rule or format, or a non-``str`` text, is a programming error and raises.
    """
    if answer_format not in get_args(AnswerFormat):
        raise ValueError(f"unknown answer_format {answer_format!r}; allowed: {get_args(AnswerFormat)}")
    if not isinstance(text, str):
        raise TypeError(f"parse_completion expects str, got {type(text).__name__}")
    if parse_rule == "vlm_r1":
        return _parse_vlm_r1(text, answer_format)
    elif parse_rule == "strict":
        return _parse_strict(text, answer_format)
    raise ValueError(f"unknown parse_rule {parse_rule!r}; allowed: {get_args(ParseRule)}")


def parse_json_line(line: bytes | str, parse_rule: str, answer_format: str) -> dict[str, Any]:
    """One line of the CLI: ``{"text": str, ...}`` -> ``{..., "box", "format_ok", "error",
    "box_problem"}``; never raises.

    Every input key but ``"text"`` (an ``"id"``, ...) is passed through; the result keys come last
    and win over an input key of the same name. Bytes are decoded as UTF-8 (invalid bytes
    replaced). A line that is not a JSON object with a string ``"text"`` gives ``box: None,
    format_ok: False`` and the reason in ``error`` (the other keys of an object still pass).
    """
    keep: dict[str, Any] = {}
    try:
        out = _parse_json_line(line, parse_rule, answer_format, keep)
    except Exception as exc:  # noqa: BLE001 - the CLI's contract is one answer line per input line
        out = {"box": None, "format_ok": False, "error": f"internal: {type(exc).__name__}: {exc}"}
    return {**keep, **out, "box_problem": out.get("box_problem")}


def _parse_json_line(line: bytes | str, parse_rule: str, answer_format: str,
                     keep: dict[str, Any]) -> dict[str, Any]:
    s = line.decode("utf-8", errors="replace") if isinstance(line, bytes) else line
    try:
        obj = json.loads(s)
    except (ValueError, RecursionError):
        return {"box": None, "format_ok": False, "error": "input: line is not valid JSON"}
    if isinstance(obj, dict):
        keep.update((k, v) for k, v in obj.items() if k != "text")
    if not isinstance(obj, dict) or "text" not in obj:
        return {"box": None, "format_ok": False, "error": 'input: expected a JSON object with "text"'}
    if not isinstance(obj["text"], str):
        return {"box": None, "format_ok": False,
                "error": f'input: "text" is {type(obj["text"]).__name__}, not a string'}
    p = parse_completion(obj["text"], answer_format, parse_rule)
    return {"box": None if p.box is None else list(p.box), "format_ok": p.format_ok,
            "error": p.error, "box_problem": p.box_problem}


def main(argv: list[str] | None = None) -> int:
    """``python -m medloc.parsing``: JSON lines ``{"text": ...}`` on stdin -> one result line each."""
    import argparse
    import os

    ap = argparse.ArgumentParser(
        prog="python -m medloc.parsing",
        description='Read JSON lines {"text": "<completion>"} on stdin; write one line '
                    '{"box": [x1, y1, x2, y2] | null, "format_ok": bool, "error": str | null} per '
                    "input line (boxes in the frame the model answered in, as written).",
    )
    ap.add_argument("--rule", choices=get_args(ParseRule), default="vlm_r1",
                    help="how the box is read (default: vlm_r1, as VLM-R1's IoU reward)")
    ap.add_argument("--answer-format", choices=get_args(AnswerFormat), default="vlm_r1_json",
                    help="what the format reward requires (default: vlm_r1_json)")
    args = ap.parse_args(argv)
    from medloc.logging import console

    try:
        for raw in sys.stdin.buffer:  # split on b"\n" only: one output line per input line
            console(json.dumps(parse_json_line(raw, args.rule, args.answer_format)))
    except BrokenPipeError:  # the reader went away (e.g. `| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
