"""medloc.parsing: completion text -> ParsedAnswer.

Covers the two accepted answer bodies (VLM-R1 JSON object, bare list) under both
``answer_format`` values, every rejection the issue lists (wrong arity, non-finite, prose, ...),
the format flags, the reference answer writer, and the never-raises contract: hypothesis on
arbitrary text, binary garbage and tag soup, plus multi-megabyte adversarial strings that a
backtracking regex would choke on.
"""

from __future__ import annotations

import math
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medloc.parsing import ParsedAnswer, parse_completion

PAPER = '<think>The lesion is central.</think><answer>{"bbox_2d": [10, 20, 300, 240]}</answer>'


def test_paper_format_with_integers():
    p = parse_completion(PAPER)
    assert p == ParsedAnswer(box=(10.0, 20.0, 300.0, 240.0), has_think=True, has_answer=True,
                             format_ok=True, error=None)


def test_floats_negative_and_whitespace():
    text = ('  <think>\n reasoning \n</think>\n\n<answer>\n  { "bbox_2d" : [ 10.5 ,20,\n'
            ' 300.25 , -1e1 ] }\n</answer>\n')
    p = parse_completion(text)
    assert p.box == (10.5, 20.0, 300.25, -10.0)  # -1e1 = -10; geometry is not parsing's business
    assert p.format_ok and p.error is None


def test_extra_keys_in_object_are_ignored():
    p = parse_completion('<think>x</think><answer>{"bbox_2d": [1, 2, 3, 4], "label": "lesion"}</answer>')
    assert p.box == (1.0, 2.0, 3.0, 4.0) and p.format_ok


def test_bare_list_accepted_for_box_but_not_for_paper_format():
    p = parse_completion("<think>x</think><answer>[1, 2, 3, 4]</answer>", "vlm_r1_json")
    assert p.box == (1.0, 2.0, 3.0, 4.0)
    assert not p.format_ok
    assert "bbox_2d" in p.error


def test_bare_list_format():
    p = parse_completion("<answer>[1,2,3.5,4]</answer>", "bare_list")
    assert p == ParsedAnswer(box=(1.0, 2.0, 3.5, 4.0), has_think=False, has_answer=True,
                             format_ok=True, error=None)
    # an optional leading think block is allowed
    assert parse_completion("<think>t</think> <answer>[1,2,3,4]</answer>", "bare_list").format_ok
    # the JSON object still yields the box, but is not the bare_list format
    p = parse_completion('<answer>{"bbox_2d": [1,2,3,4]}</answer>', "bare_list")
    assert p.box == (1.0, 2.0, 3.0, 4.0) and not p.format_ok


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("[1, 2, 3]", "expected 4 coordinates, got 3"),
        ("[1, 2, 3, 4, 5]", "expected 4 coordinates, got 5"),
        ("[1, 2, NaN, 4]", "non-finite"),
        ("[1, 2, Infinity, 4]", "non-finite"),
        ("[1, 2, -Infinity, 4]", "non-finite"),
        ("[1, 2, 1e999, 4]", "non-finite"),  # json reads 1e999 as inf
        ('[1, 2, "3", 4]', "not a number"),
        ("[1, 2, true, 4]", "not a number"),
        ("[1, 2, null, 4]", "not a number"),
        ("[[1, 2, 3, 4]]", "expected 4 coordinates, got 1"),
        ('[{"bbox_2d": [1, 2, 3, 4]}]', "expected 4 coordinates, got 1"),
        ('{"box": [1, 2, 3, 4]}', 'no "bbox_2d" key'),
        ('{"bbox_2d": "1,2,3,4"}', "expected a list"),
        ("The box is [1, 2, 3, 4].", "neither a JSON object nor a list"),
        ('```json\n{"bbox_2d": [1, 2, 3, 4]}\n```', "neither a JSON object nor a list"),
        ("[1, 2, 3, 4] [5, 6, 7, 8]", "not valid JSON"),
        ("[1, 2, 3, 4", "not valid JSON"),
        ("[1 2 3 4]", "not valid JSON"),
        ("", "empty"),
        ("[" + "9" * 5000 + ", 1, 2, 3]", "not valid JSON"),  # beyond Python's int-digit limit
        ("[" * 100_000, "not valid JSON"),  # nesting deeper than the recursion limit
    ],
)
def test_rejections(body, reason):
    p = parse_completion(f"<think>x</think><answer>{body}</answer>")
    assert p.box is None
    assert not p.format_ok
    assert reason in p.error
    assert p.has_think and p.has_answer


def test_huge_integer_that_fits_a_float_is_accepted():
    big = "1" + "0" * 300  # 1e300 as an integer literal: finite as a float
    p = parse_completion(f"<answer>[0, 0, {big}, 1]</answer>", "bare_list")
    assert p.box == (0.0, 0.0, 1e300, 1.0)
    overflow = "1" + "0" * 400  # 1e400 does not fit a float
    assert "overflows" in parse_completion(f"<answer>[0, 0, {overflow}, 1]</answer>").error


@pytest.mark.parametrize(
    ("text", "has_think", "has_answer", "reason"),
    [
        ('<answer>{"bbox_2d": [1,2,3,4]}</answer>', False, True, "exactly one <think>"),
        ('<think>x</think> hello <answer>{"bbox_2d": [1,2,3,4]}</answer>', True, True,
         "<answer> must follow </think>"),
        ('Sure! <think>x</think><answer>{"bbox_2d": [1,2,3,4]}</answer>', True, True,
         "start with <think>"),
        ('<think>x</think><answer>{"bbox_2d": [1,2,3,4]}</answer> done', True, True,
         "text after </answer>"),
        ('<think>x</think><answer>{"bbox_2d": [1,2,3,4]}</answer><answer>[1,2,3,4]</answer>',
         True, True, "exactly one <answer>"),
        ('<think>a<think>b</think><answer>{"bbox_2d": [1,2,3,4]}</answer>', True, True,
         "exactly one <think>"),
    ],
)
def test_format_failures_keep_the_box(text, has_think, has_answer, reason):
    p = parse_completion(text)
    assert p.box == (1.0, 2.0, 3.0, 4.0)  # the box is still extracted from the first <answer>
    assert not p.format_ok
    assert (p.has_think, p.has_answer) == (has_think, has_answer)
    assert reason in p.error


def test_missing_or_unclosed_answer():
    p = parse_completion("<think>I am not sure.</think>")
    assert p.box is None and not p.has_answer and not p.format_ok
    assert p.error == "no <answer>...</answer> block"
    p = parse_completion("<think>x</think><answer>[1,2,3,4]")
    assert p.box is None and not p.has_answer
    # a closing tag before the opening one does not count as a pair
    p = parse_completion("</answer>[1,2,3,4]<answer>")
    assert p.box is None and not p.has_answer


def test_unknown_answer_format_and_non_str():
    with pytest.raises(ValueError, match="vlm_r1_json"):
        parse_completion(PAPER, "xml")
    with pytest.raises(TypeError, match="str"):
        parse_completion(b"<answer>[1,2,3,4]</answer>")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "fmt,text",
    [
        ("vlm_r1_json",
         '<think>look at the lesion</think><answer>{"bbox_2d": [12, 7.5, 300.0, 221.25]}</answer>'),
        ("bare_list", "<think>look at the lesion</think><answer>[12, 7.5, 300.0, 221.25]</answer>"),
    ],
)
def test_float_coordinates_round_trip(fmt, text):
    p = parse_completion(text, fmt)
    assert p.box == (12.0, 7.5, 300.0, 221.25) and p.format_ok and p.error is None


# ----------------------------------------------------------------------------- adversarial sizes
@pytest.mark.parametrize(
    "text",
    [
        "<think>" * 200_000,
        "<answer>" * 200_000 + "</answer>",
        "<think>" * 100_000 + "</think>" * 100_000 + "<answer>" + "[1," * 100_000 + "</answer>",
        "<answer>[" + "1, " * 300_000 + "1]</answer>",
        "<answer>{" + '"a": 1, ' * 200_000 + '"bbox_2d": [1,2,3,4]}</answer>',
        "x" * 3_000_000,
    ],
    ids=["think-open", "answer-open", "tag-soup", "long-list", "wide-object", "3MB-prose"],
)
def test_huge_strings_are_linear_time(text):
    t0 = time.perf_counter()
    p = parse_completion(text)
    elapsed = time.perf_counter() - t0
    assert isinstance(p, ParsedAnswer)
    assert elapsed < 2.0, f"parsing {len(text):,} chars took {elapsed:.2f}s"


# ----------------------------------------------------------------------------- properties
def _check_invariants(p: ParsedAnswer) -> None:
    assert isinstance(p, ParsedAnswer)
    if p.box is not None:
        assert len(p.box) == 4 and all(isinstance(v, float) and math.isfinite(v) for v in p.box)
    if p.format_ok:  # the format reward implies a usable box and both flags
        assert p.box is not None and p.has_answer and p.error is None
    else:
        assert isinstance(p.error, str) and p.error


fragments = st.sampled_from([
    "<think>", "</think>", "<answer>", "</answer>", "{", "}", "[", "]", ",", " ", "\n",
    '"bbox_2d"', ":", "1", "-2.5", "1e999", "NaN", "true", "null", '"', "\\", "\x00", "\ud800",
])


@settings(max_examples=200, deadline=None)
@given(st.text(), st.sampled_from(["vlm_r1_json", "bare_list"]))
def test_never_raises_on_any_text(text, fmt):
    _check_invariants(parse_completion(text, fmt))


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=2000))
def test_never_raises_on_binary_garbage(data):
    _check_invariants(parse_completion(data.decode("latin-1")))
    _check_invariants(parse_completion(data.decode("utf-8", errors="surrogateescape"), "bare_list"))


@settings(max_examples=200, deadline=None)
@given(st.lists(fragments, max_size=60).map("".join), st.sampled_from(["vlm_r1_json", "bare_list"]))
def test_never_raises_on_tag_soup(text, fmt):
    _check_invariants(parse_completion(text, fmt))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.integers(-10**6, 10**6),
                          st.floats(allow_nan=False, allow_infinity=False)), min_size=4, max_size=4))
def test_valid_numbers_round_trip(coords):
    import json

    body = json.dumps({"bbox_2d": coords})
    p = parse_completion(f"<think></think><answer>{body}</answer>")
    assert p.format_ok
    assert p.box == tuple(float(c) for c in coords)


@pytest.mark.parametrize("answer_format", ["bare_list", "vlm_r1_json"])
def test_parse_reads_back_the_sft_target(answer_format: str) -> None:
    """The answer text SFT trains on (medloc.data.prompts.format_answer) parses to its own box."""
    from medloc.data.prompts import format_answer

    text = format_answer([10.4, 20.5, 30.6, 40.0], answer_format, think_text="")
    parsed = parse_completion(text, answer_format)
    # integer coordinates, halves rounded up: [10, 21, 31, 40]
    assert parsed.box == (10.0, 21.0, 31.0, 40.0) and parsed.format_ok and parsed.error is None
