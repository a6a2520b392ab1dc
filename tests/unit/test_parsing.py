"""medloc.parsing: completion text -> ParsedAnswer, under both rules, and the command line.

- A corpus of completions in every style a model writes (Qwen2.5-VL's native list, fenced JSON,
  the VLM-R1 object, a bare list, prose, several boxes, decimals, negatives, no answer tag, three
  or five numbers, garbage), each with its expected box under ``vlm_r1`` and under ``strict``.
- The format reward of each (rule, answer_format) pair, hand-written cases.
- The strict rule's rejections, as before.
- The never-raises contract: hypothesis on arbitrary text, binary garbage and tag soup, under both
  rules; multi-megabyte adversarial strings that a backtracking regex would choke on.
- ``python -m medloc.parsing`` through a subprocess: one output line per input line, whatever the
  line holds.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medloc.parsing import ParsedAnswer, box_problem, parse_completion, parse_json_line

ROOT = Path(__file__).resolve().parents[2]
RULES = ["vlm_r1", "strict"]
FORMATS = ["vlm_r1_json", "bare_list"]
PAPER = '<think>The lesion is central.</think><answer>{"bbox_2d": [10, 20, 300, 240]}</answer>'
T = "<think>The lesion is in the upper left.</think>"
B = (12.0, 30.0, 80.0, 95.0)

# ----------------------------------------------------------------------------- the corpus
# (id, completion, expected box under vlm_r1, expected box under strict)
CORPUS = [
    ("native-list", T + '<answer>[{"bbox_2d": [12, 30, 80, 95], "label": "lesion"}]</answer>',
     B, None),
    ("native-fenced", T + '<answer>```json\n[\n\t{"bbox_2d": [12, 30, 80, 95], "label": "lesion"}\n'
     ']\n```</answer>', B, None),
    ("fenced-object", T + '<answer>```json\n{"bbox_2d": [12, 30, 80, 95]}\n```</answer>', B, None),
    ("vlm-r1-object", T + '<answer>{"bbox_2d": [12, 30, 80, 95]}</answer>', B, B),
    ("object-with-label", T + '<answer>{"bbox_2d": [12, 30, 80, 95], "label": "mass"}</answer>',
     B, B),
    ("bare-list", T + "<answer>[12, 30, 80, 95]</answer>", B, B),
    ("bare-list-no-think", "<answer>[12,30,80,95]</answer>", B, B),
    ("spaces-everywhere", T + "<answer>\n [ 12 ,30 ,\n 80,  95 ] \n</answer>", B, B),
    ("prose", T + "<answer>The lesion is at [12, 30, 80, 95].</answer>", B, None),
    ("prose-before-json", T + '<answer>Here it is: {"bbox_2d": [12, 30, 80, 95]}</answer>', B, None),
    # several boxes: the FIRST list of four numbers counts (VLM-R1's re.search); strict reads none
    ("several-native", T + '<answer>[{"bbox_2d": [12, 30, 80, 95], "label": "a"}, '
     '{"bbox_2d": [1, 2, 3, 4], "label": "b"}]</answer>', B, None),
    ("several-bare", T + "<answer>[12, 30, 80, 95] [1, 2, 3, 4]</answer>", B, None),
    ("several-prose", T + "<answer>either [12, 30, 80, 95] or [1, 2, 3, 4]</answer>", B, None),
    ("nested-list", T + "<answer>[[12, 30, 80, 95]]</answer>", B, None),
    ("first-list-has-3", T + "<answer>[7, 8, 9] then [12, 30, 80, 95]</answer>", B, None),
    # numbers
    ("decimals", T + '<answer>{"bbox_2d": [12.5, 30.25, 80.0, 95.75]}</answer>',
     (12.5, 30.25, 80.0, 95.75), (12.5, 30.25, 80.0, 95.75)),
    ("leading-dot", T + "<answer>[.5, 30, 80, 95]</answer>", (0.5, 30.0, 80.0, 95.0), None),
    ("negatives", T + '<answer>{"bbox_2d": [-3, -0.5, 80, 95]}</answer>',
     (-3.0, -0.5, 80.0, 95.0), (-3.0, -0.5, 80.0, 95.0)),
    ("negative-leading-dot", T + "<answer>[-.5, 30, 80, 95]</answer>", (-0.5, 30.0, 80.0, 95.0),
     None),
    ("exponent", T + "<answer>[1e2, 30, 80, 95]</answer>", None, (100.0, 30.0, 80.0, 95.0)),
    ("plus-sign", T + "<answer>[+12, 30, 80, 95]</answer>", None, None),
    ("trailing-dot", T + "<answer>[12., 30, 80, 95]</answer>", None, None),
    ("quoted-numbers", T + '<answer>{"bbox_2d": ["12", "30", "80", "95"]}</answer>', None, None),
    ("nan", T + "<answer>[NaN, 30, 80, 95]</answer>", None, None),
    ("overflow", T + "<answer>[1" + "0" * 400 + ", 30, 80, 95]</answer>", None, None),
    ("three-numbers", T + "<answer>[12, 30, 80]</answer>", None, None),
    ("five-numbers", T + "<answer>[12, 30, 80, 95, 4]</answer>", None, None),
    ("no-commas", T + "<answer>[12 30 80 95]</answer>", None, None),
    # tags
    ("no-answer-tag", T + '{"bbox_2d": [12, 30, 80, 95]}', None, None),
    ("no-tags-native", '```json\n[{"bbox_2d": [12, 30, 80, 95], "label": "lesion"}]\n```', None, None),
    ("unclosed-answer", T + "<answer>[12, 30, 80, 95]", None, None),
    ("closing-before-opening", "</answer>[12, 30, 80, 95]<answer>", None, None),
    ("box-outside-answer", T + "[1, 2, 3, 4] <answer>[12, 30, 80, 95]</answer>", B, B),
    ("box-after-answer", T + "<answer>none</answer> [12, 30, 80, 95]", None, None),
    ("two-answer-blocks", T + "<answer>[12, 30, 80, 95]</answer><answer>[1, 2, 3, 4]</answer>",
     B, B),
    ("empty-answer", T + "<answer></answer>", None, None),
    ("garbage", "}{][,,<answer>]]][[[ -- . ,</answer>\x00\ud800", None, None),
    ("empty", "", None, None),
]


@pytest.mark.parametrize(("name", "text", "vlm_r1_box", "strict_box"), CORPUS,
                         ids=[c[0] for c in CORPUS])
@pytest.mark.parametrize("answer_format", FORMATS)
def test_corpus_box_under_each_rule(name, text, vlm_r1_box, strict_box, answer_format):
    for rule, expected in (("vlm_r1", vlm_r1_box), ("strict", strict_box)):
        p = parse_completion(text, answer_format, rule)
        assert p.box == expected, f"{name} under {rule}: {p}"
        if expected is None:
            assert not p.format_ok and p.error
        assert p.has_answer == _has_answer_pair(text)


def _has_answer_pair(text: str) -> bool:
    i = text.find("<answer>")
    return i >= 0 and text.find("</answer>", i + 8) >= 0


def test_corpus_has_every_style_the_issue_names():
    names = {c[0] for c in CORPUS}
    for style in ("native-list", "native-fenced", "bare-list", "prose", "several-native",
                  "decimals", "negatives", "no-answer-tag", "three-numbers", "garbage"):
        assert style in names


def test_several_boxes_first_one_counts():
    """The rule for several boxes, pinned: VLM-R1 reads the first list of four numbers."""
    text = "<answer>[{\"bbox_2d\": [5, 6, 7, 8]}, {\"bbox_2d\": [1, 2, 3, 4]}]</answer>"
    assert parse_completion(text, "bare_list", "vlm_r1").box == (5.0, 6.0, 7.0, 8.0)
    assert parse_completion(text, "bare_list", "strict").box is None


def test_no_answer_tag_is_no_box_under_vlm_r1():
    """VLM-R1's IoU reward is 0 when <answer>(.*?)</answer> does not match: no fallback."""
    p = parse_completion("<think>x</think>[12, 30, 80, 95]", "bare_list", "vlm_r1")
    assert p == ParsedAnswer(None, True, False, False, "no <answer>...</answer> block")


# ----------------------------------------------------------------------------- format reward
@pytest.mark.parametrize(
    ("text", "ok", "reason"),
    [
        ('<think>x</think>\n<answer>{"bbox_2d": [1, 2, 3, 4]}</answer>', True, None),
        ('<think>x</think><answer>[{"bbox_2d": [1, 2, 3, 4], "label": "a"}]</answer>', True, None),
        ('<think>x</think><answer>```json\n[{"bbox_2d": [1, 2, 3, 4]}]\n```</answer>', True, None),
        # unanchored, as VLM-R1's re.search: text before <think> and after </answer> is fine
        ('Sure! <think>x</think><answer>{"bbox_2d": [1.5, 2, 3, 4]}</answer> done', True, None),
        ('<think></think><answer>{"bbox_2d": [-1, 2, 3, 4]}</answer>', True, None),
        ('<answer>{"bbox_2d": [1, 2, 3, 4]}</answer>', False, "must follow <think>"),
        ('</think><answer>{"bbox_2d": [1, 2, 3, 4]}</answer>', False, "must follow <think>"),
        ('<think>x</think> so: <answer>{"bbox_2d": [1, 2, 3, 4]}</answer>', False,
         "must follow <think>"),
        ("<think>x</think><answer>[1, 2, 3, 4]</answer>", False, "inside a JSON object"),
        ("<think>x</think><answer>at [1, 2, 3, 4].</answer>", False, "inside a JSON object"),
        ("<think>x</think><answer>[1, 2, 3, 4] }</answer>", False, "inside a JSON object"),
        ("<think>x</think><answer>{ [1, 2, 3, 4]</answer>", False, "inside a JSON object"),
        ("<think>x</think><answer>{[1, 2, 3]}</answer>", False, "list of four numbers"),
    ],
)
def test_vlm_r1_format_for_vlm_r1_json(text, ok, reason):
    p = parse_completion(text, "vlm_r1_json", "vlm_r1")
    assert p.format_ok is ok
    if ok:
        assert p.error is None and p.box is not None
    else:
        assert reason in p.error


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("<answer>[1, 2, 3, 4]</answer>", True),
        ("<think>t</think><answer>[1, 2, 3, 4]</answer>", True),
        ('<answer>{"bbox_2d": [1, 2, 3, 4]}</answer>', True),
        ("the box: <answer>about [1, 2, 3, 4]</answer> ok", True),
        ("<answer>[1, 2, 3]</answer>", False),
        ("[1, 2, 3, 4]", False),
    ],
)
def test_vlm_r1_format_for_bare_list(text, ok):
    """Under bare_list the vlm_r1 format is VLM-R1's pattern without think block and braces."""
    p = parse_completion(text, "bare_list", "vlm_r1")
    assert p.format_ok is ok and (p.box is not None) is ok


def test_paper_format_with_integers_both_rules():
    for rule in RULES:
        assert parse_completion(PAPER, "vlm_r1_json", rule) == ParsedAnswer(
            box=(10.0, 20.0, 300.0, 240.0), has_think=True, has_answer=True, format_ok=True,
            error=None)


def test_default_rule_is_vlm_r1():
    native = '<think>x</think><answer>[{"bbox_2d": [1, 2, 3, 4], "label": "a"}]</answer>'
    assert parse_completion(native) == parse_completion(native, "vlm_r1_json", "vlm_r1")
    assert parse_completion(native).box == (1.0, 2.0, 3.0, 4.0)


# ----------------------------------------------------------------------------- strict rule
def strict(text: str, answer_format: str = "vlm_r1_json") -> ParsedAnswer:
    return parse_completion(text, answer_format, "strict")


def test_strict_floats_negative_and_whitespace():
    text = ('  <think>\n reasoning \n</think>\n\n<answer>\n  { "bbox_2d" : [ 10.5 ,20,\n'
            ' 300.25 , -1e1 ] }\n</answer>\n')
    p = strict(text)
    assert p.box == (10.5, 20.0, 300.25, -10.0)  # -1e1 = -10: the numbers are read as written
    # y2 = -10 < y1 = 20: an inverted box is not a valid strict answer (issue 20, finding 8)
    assert p.box_problem == "inverted" and not p.format_ok
    assert p.error.startswith("inverted box [10.5, 20, 300.25, -10]")


def test_strict_extra_keys_in_object_are_ignored():
    p = strict('<think>x</think><answer>{"bbox_2d": [1, 2, 3, 4], "label": "lesion"}</answer>')
    assert p.box == (1.0, 2.0, 3.0, 4.0) and p.format_ok


def test_strict_bare_list_accepted_for_box_but_not_for_paper_format():
    p = strict("<think>x</think><answer>[1, 2, 3, 4]</answer>", "vlm_r1_json")
    assert p.box == (1.0, 2.0, 3.0, 4.0)
    assert not p.format_ok
    assert "bbox_2d" in p.error


def test_strict_bare_list_format():
    p = strict("<answer>[1,2,3.5,4]</answer>", "bare_list")
    assert p == ParsedAnswer(box=(1.0, 2.0, 3.5, 4.0), has_think=False, has_answer=True,
                             format_ok=True, error=None)
    # an optional leading think block is allowed
    assert strict("<think>t</think> <answer>[1,2,3,4]</answer>", "bare_list").format_ok
    # the JSON object still yields the box, but is not the bare_list format
    p = strict('<answer>{"bbox_2d": [1,2,3,4]}</answer>', "bare_list")
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
        ('[{"bbox_2d": [1, 2, 3, 4]}]', "a list of objects (Qwen2.5-VL's native"),
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
def test_strict_rejections(body, reason):
    p = strict(f"<think>x</think><answer>{body}</answer>")
    assert p.box is None
    assert not p.format_ok
    assert reason in p.error
    assert p.has_think and p.has_answer


def test_strict_huge_integer_that_fits_a_float_is_accepted():
    big = "1" + "0" * 300  # 1e300 as an integer literal: finite as a float
    p = strict(f"<answer>[0, 0, {big}, 1]</answer>", "bare_list")
    assert p.box == (0.0, 0.0, 1e300, 1.0)
    overflow = "1" + "0" * 400  # 1e400 does not fit a float
    assert "overflows" in strict(f"<answer>[0, 0, {overflow}, 1]</answer>").error


def test_vlm_r1_huge_integer():
    big = "1" + "0" * 300
    assert parse_completion(f"<answer>[0, 0, {big}, 1]</answer>", "bare_list").box == (0.0, 0.0, 1e300, 1.0)
    overflow = "1" + "0" * 400  # float("1000…0") is inf: the first list counts, so no box
    p = parse_completion(f"<answer>[0, 0, {overflow}, 1] [1, 2, 3, 4]</answer>", "bare_list")
    assert p.box is None and "overflows" in p.error


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
def test_strict_format_failures_keep_the_box(text, has_think, has_answer, reason):
    p = strict(text)
    assert p.box == (1.0, 2.0, 3.0, 4.0)  # the box is still extracted from the first <answer>
    assert not p.format_ok
    assert (p.has_think, p.has_answer) == (has_think, has_answer)
    assert reason in p.error


@pytest.mark.parametrize("rule", RULES)
def test_missing_or_unclosed_answer(rule):
    p = parse_completion("<think>I am not sure.</think>", "vlm_r1_json", rule)
    assert p.box is None and not p.has_answer and not p.format_ok
    assert p.error == "no <answer>...</answer> block"
    p = parse_completion("<think>x</think><answer>[1,2,3,4]", "vlm_r1_json", rule)
    assert p.box is None and not p.has_answer
    # a closing tag before the opening one does not count as a pair
    p = parse_completion("</answer>[1,2,3,4]<answer>", "vlm_r1_json", rule)
    assert p.box is None and not p.has_answer


def test_unknown_answer_format_rule_and_non_str():
    with pytest.raises(ValueError, match="vlm_r1_json"):
        parse_completion(PAPER, "xml")
    with pytest.raises(ValueError, match="strict"):
        parse_completion(PAPER, "vlm_r1_json", "lenient")
    with pytest.raises(TypeError, match="str"):
        parse_completion(b"<answer>[1,2,3,4]</answer>")  # type: ignore[arg-type]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize(
    "fmt,text",
    [
        ("vlm_r1_json",
         '<think>look at the lesion</think><answer>{"bbox_2d": [12, 7.5, 300.0, 221.25]}</answer>'),
        ("bare_list", "<think>look at the lesion</think><answer>[12, 7.5, 300.0, 221.25]</answer>"),
    ],
)
def test_float_coordinates_round_trip(fmt, text, rule):
    p = parse_completion(text, fmt, rule)
    assert p.box == (12.0, 7.5, 300.0, 221.25) and p.format_ok and p.error is None


# ----------------------------------------------------------------------------- adversarial sizes
N = 3_000_000
HUGE = {
    "think-open": "<think>" * 200_000,
    "answer-open": "<answer>" * 200_000 + "</answer>",
    "tag-soup": "<think>" * 100_000 + "</think>" * 100_000 + "<answer>" + "[1," * 100_000 + "</answer>",
    "long-list": "<answer>[" + "1, " * 300_000 + "1]</answer>",
    "wide-object": "<answer>{" + '"a": 1, ' * 200_000 + '"bbox_2d": [1,2,3,4]}</answer>',
    "3MB-prose": "x" * N,
    # the inputs that would make VLM-R1's own -?\d*\.?\d+ pattern (or a careless one) backtrack
    "digit-run": "<answer>[" + "1" * N + "</answer>",
    "space-run": "<answer>[1," + " " * N + "x</answer>",
    "open-brackets": "<answer>" + "[" * N + "</answer>",
    "bracket-minus": "<answer>" + "[-" * (N // 2) + "</answer>",
    "bracket-space": "<answer>" + "[ " * (N // 2) + "</answer>",
    "almost-boxes": "<answer>" + "[1, 2, 3, 4 ," * (N // 13) + "</answer>",
    "four-then-digits": "<answer>[1,1,1,1" + "1" * N + "</answer>",
    "dot-run": "<answer>[." + "1" * N + ".</answer>",
}


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("name", list(HUGE))
def test_huge_strings_are_linear_time(name, rule):
    text = HUGE[name]
    t0 = time.perf_counter()
    p = parse_completion(text, "vlm_r1_json", rule)
    elapsed = time.perf_counter() - t0
    assert isinstance(p, ParsedAnswer)
    assert elapsed < 2.0, f"parsing {len(text):,} chars ({name}, {rule}) took {elapsed:.2f}s"


def test_the_box_after_megabytes_of_near_misses_is_found():
    text = "<answer>" + "[1, 2, 3 " * 300_000 + "[5, 6, 7, 8]</answer>"
    assert parse_completion(text, "bare_list", "vlm_r1").box == (5.0, 6.0, 7.0, 8.0)


# ----------------------------------------------------------------------------- properties
def _check_invariants(p: ParsedAnswer) -> None:
    assert isinstance(p, ParsedAnswer)
    if p.box is not None:
        assert len(p.box) == 4 and all(isinstance(v, float) and math.isfinite(v) for v in p.box)
        assert p.has_answer
    if p.format_ok:  # the format reward implies a usable box and both flags
        assert p.box is not None and p.has_answer and p.error is None
    else:
        assert isinstance(p.error, str) and p.error


fragments = st.sampled_from([
    "<think>", "</think>", "<answer>", "</answer>", "{", "}", "[", "]", ",", " ", "\n",
    '"bbox_2d"', ":", "1", "-2.5", ".5", "-", ".", "1e999", "NaN", "true", "null", '"', "\\",
    "```json", "\x00", "\ud800", "\u0663",  # an Arabic-Indic digit: \d, and float() reads it
])
rules = st.sampled_from(RULES)
formats = st.sampled_from(FORMATS)


@settings(max_examples=200, deadline=None)
@given(st.text(), formats, rules)
def test_never_raises_on_any_text(text, fmt, rule):
    _check_invariants(parse_completion(text, fmt, rule))


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=2000), rules)
def test_never_raises_on_binary_garbage(data, rule):
    _check_invariants(parse_completion(data.decode("latin-1"), "vlm_r1_json", rule))
    _check_invariants(parse_completion(data.decode("utf-8", errors="surrogateescape"), "bare_list", rule))


@settings(max_examples=300, deadline=None)
@given(st.lists(fragments, max_size=60).map("".join), formats, rules)
def test_never_raises_on_tag_soup(text, fmt, rule):
    _check_invariants(parse_completion(text, fmt, rule))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.integers(-10**6, 10**6),
                          st.floats(allow_nan=False, allow_infinity=False)), min_size=4, max_size=4),
       st.text(alphabet=" \n\t", max_size=3))
def test_valid_numbers_round_trip(coords, ws):
    body = json.dumps({"bbox_2d": coords})
    text = f"<think></think>{ws}<answer>{body}</answer>"
    valid = coords[2] > coords[0] and coords[3] > coords[1]  # an inverted/empty box is flagged
    assert strict(text).format_ok is valid and strict(text).box == tuple(float(c) for c in coords)
    # vlm_r1 reads json's output except exponents (1e-07, 1e+16): VLM-R1's pattern has none
    p = parse_completion(text, "vlm_r1_json", "vlm_r1")
    if any("e" in json.dumps(c) for c in coords):
        assert p.box is None
    else:
        assert p.format_ok and p.box == tuple(float(c) for c in coords)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("answer_format", FORMATS)
def test_parse_reads_back_the_sft_target(answer_format: str, rule: str) -> None:
    """The answer text SFT trains on (medloc.data.prompts.format_answer) parses to its own box."""
    from medloc.data.prompts import format_answer

    text = format_answer([10.4, 20.5, 30.6, 40.0], answer_format, think_text="")
    parsed = parse_completion(text, answer_format, rule)
    # integer coordinates, halves rounded up: [10, 21, 31, 40]
    assert parsed.box == (10.0, 21.0, 31.0, 40.0) and parsed.format_ok and parsed.error is None


# ----------------------------------------------------------------------------- command line
def test_parse_json_line_in_process():
    line = json.dumps({"text": T + '<answer>[{"bbox_2d": [12, 30, 80, 95]}]</answer>'})
    assert parse_json_line(line, "vlm_r1", "vlm_r1_json") == {
        "box": [12.0, 30.0, 80.0, 95.0], "format_ok": True, "error": None, "box_problem": None}
    assert parse_json_line(line.encode(), "strict", "vlm_r1_json")["box"] is None
    assert parse_json_line(b"\xff\xfe", "vlm_r1", "bare_list")["error"] == "input: line is not valid JSON"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), rules, formats)
def test_parse_json_line_never_raises(data, rule, fmt):
    out = parse_json_line(data, rule, fmt)
    assert {"box", "format_ok", "error", "box_problem"} <= set(out)
    json.dumps(out)  # always serialisable


def _run_cli(stdin: bytes, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medloc.parsing", *args], input=stdin,
                          capture_output=True, cwd=ROOT, timeout=120, check=False)


def test_cli_one_line_out_per_line_in_whatever_it_holds():
    lines = [
        json.dumps({"text": T + '<answer>```json\n[{"bbox_2d": [12, 30, 80, 95], "label": "x"}]\n```</answer>'}).encode(),
        json.dumps({"text": T + "<answer>The lesion is at [1.5, -2, 3, 4].</answer>"}).encode(),
        json.dumps({"text": "no answer at all"}).encode(),
        b'{"text": "<answer>[1, 2, 3, 4]</answer>", "id": 7}',
        b"not json {",
        b"",                                   # a blank line is a line
        b'{"txt": "<answer>[1, 2, 3, 4]</answer>"}',
        b'{"text": 42}',
        b'{"text": null}',
        b'["<answer>[1, 2, 3, 4]</answer>"]',
        b"[" * 100_000,                        # deeper than json's recursion limit
        b'{"text": "\xff\xfe <answer>[1, 2, 3, 4]</answer>"}',  # invalid UTF-8
        json.dumps({"text": "a\u2028b\r<answer>[1, 2, 3, 4]</answer>"}, ensure_ascii=False).encode(),
        b'{"text": "<answer>[1, 2, 3, 4]</answer>"}\r',           # CRLF line ending
        b'{"text": "<answer>[9, 9, 9, 9]</answer>"}',             # last line, no newline
    ]
    proc = _run_cli(b"\n".join(lines), "--rule", "vlm_r1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == b""
    out = [json.loads(x) for x in proc.stdout.decode().splitlines()]
    assert len(out) == len(lines)
    for o in out:
        assert {"box", "format_ok", "error", "box_problem"} <= set(o)
    assert out[3]["id"] == 7  # input keys other than "text" pass through (issue 20, finding 8)
    assert all("text" not in o for o in out)
    boxes = [o["box"] for o in out]
    assert boxes == [[12.0, 30.0, 80.0, 95.0], [1.5, -2.0, 3.0, 4.0], None, [1.0, 2.0, 3.0, 4.0],
                     None, None, None, None, None, None, None, [1.0, 2.0, 3.0, 4.0],
                     [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], [9.0, 9.0, 9.0, 9.0]]
    assert [o["format_ok"] for o in out[:3]] == [True, False, False]
    assert out[4]["error"] == "input: line is not valid JSON"
    assert out[6]["error"] == 'input: expected a JSON object with "text"'
    assert out[7]["error"] == 'input: "text" is int, not a string'


def test_cli_rules_and_formats_differ_as_documented():
    native = json.dumps({"text": T + '<answer>[{"bbox_2d": [12, 30, 80, 95], "label": "x"}]</answer>'})
    bare = json.dumps({"text": "<answer>[12, 30, 80, 95]</answer>"})
    stdin = (native + "\n" + bare + "\n").encode()
    strict_out = [json.loads(x) for x in _run_cli(stdin, "--rule", "strict").stdout.splitlines()]
    assert [o["box"] for o in strict_out] == [None, [12.0, 30.0, 80.0, 95.0]]
    bare_out = [json.loads(x) for x in _run_cli(stdin, "--rule", "vlm_r1", "--answer-format",
                                                "bare_list").stdout.splitlines()]
    assert [o["format_ok"] for o in bare_out] == [True, True]
    default_out = [json.loads(x) for x in _run_cli(stdin).stdout.splitlines()]
    assert [o["format_ok"] for o in default_out] == [True, False]  # vlm_r1 + vlm_r1_json


def test_cli_empty_input_and_bad_flag():
    proc = _run_cli(b"", "--rule", "strict")
    assert proc.returncode == 0 and proc.stdout == b""
    proc = _run_cli(b"{}\n", "--rule", "lenient")
    assert proc.returncode == 2 and b"invalid choice" in proc.stderr  # argparse, not a traceback


# ----------------------------------------------------------------------------- faithfulness
# VLM-R1's REC IoU reward reads the box with this pattern (re.search on the stripped answer body);
# on short strings its backtracking is harmless, so it serves as the reference for the vlm_r1 rule.
VLM_R1_BOX_PATTERN = r"\[(\s*-?\d*\.?\d+\s*),\s*(\s*-?\d*\.?\d+\s*),\s*(\s*-?\d*\.?\d+\s*),\s*(\s*-?\d*\.?\d+\s*)\]"
box_fragments = st.sampled_from(["[", "]", ",", ", ", " ", "\n", "1", "23", "-", ".", ".5", "e",
                                 "x", "{", "}", '"bbox_2d": ', "\u0663"])


@settings(max_examples=500, deadline=None)
@given(st.lists(box_fragments, max_size=40).map("".join))
def test_vlm_r1_rule_reads_what_vlm_r1s_pattern_reads(body):
    import re

    m = re.search(VLM_R1_BOX_PATTERN, body.strip())
    expected = None if m is None else tuple(float(g) for g in m.groups())
    if expected is not None and not all(math.isfinite(v) for v in expected):
        expected = None
    assert parse_completion(f"<answer>{body}</answer>", "bare_list", "vlm_r1").box == expected


# ----------------------------------------------------------------------------- configuration
def test_reward_config_parse_rule_default_and_check():
    from omegaconf import OmegaConf

    from medloc.config import RewardConfig

    assert RewardConfig().parse_rule == "vlm_r1"
    assert RewardConfig(parse_rule="strict").parse_rule == "strict"
    with pytest.raises(ValueError, match="reward.parse_rule='lenient'"):
        RewardConfig(parse_rule="lenient")
    yaml = OmegaConf.load(ROOT / "conf" / "reward" / "default.yaml")
    assert yaml.parse_rule == "vlm_r1"


# ----------------------------------------------------------------------------- inverted / empty boxes
@pytest.mark.parametrize("box,problem", [
    ("[110, 220, 10, 20]", "inverted"),   # x2 < x1 and y2 < y1
    ("[10, 220, 110, 20]", "inverted"),   # y2 < y1 only
    ("[10, 20, 10, 90]", "empty"),        # zero width
    ("[10, 20, 110, 20]", "empty"),       # zero height
    ("[10, 20, 110, 220]", None),
])
def test_inverted_and_empty_boxes_are_flagged(box, problem):
    # Issue 20, finding 8. vlm_r1: the flag beside the box, format_ok/error as before (VLM-R1's
    # format reward takes any four numbers, so training under the default rule is unchanged);
    # strict: not a valid box, so no format reward, and the error says why.
    text = f"<answer>{box}</answer>"
    loose = parse_completion(text, "bare_list", "vlm_r1")
    assert loose.box_problem == problem
    assert loose.format_ok and loose.error is None
    tight = parse_completion(text, "bare_list", "strict")
    assert tight.box == loose.box and tight.box_problem == problem
    assert tight.format_ok is (problem is None)
    if problem is not None:
        assert tight.error.startswith(f"{problem} box ")


def test_box_problem_function():
    assert box_problem(None) is None
    assert box_problem((0.0, 0.0, 1.0, 1.0)) is None
    assert box_problem((1.0, 0.0, 0.0, 1.0)) == "inverted"
    assert box_problem((1.0, 1.0, 1.0, 0.0)) == "inverted"  # inverted wins over empty
    assert box_problem((1.0, 0.0, 1.0, 1.0)) == "empty"


def test_strict_names_what_it_wants_for_qwen_native_list():
    p = strict(T + '<answer>[{"bbox_2d": [12, 30, 80, 95], "label": "lesion"}]</answer>')
    assert p.box is None and not p.format_ok
    assert "Qwen2.5-VL's native" in p.error and '{"bbox_2d": [x1, y1, x2, y2]}' in p.error
    assert "reward.parse_rule=vlm_r1" in p.error


def test_cli_passes_every_input_key_but_text():
    line = json.dumps({"id": "ISIC_1", "image": "a.jpg", "text": "<answer>[110, 220, 10, 20]</answer>",
                       "box": "old"})
    out = parse_json_line(line, "vlm_r1", "bare_list")
    assert out == {"id": "ISIC_1", "image": "a.jpg", "box": [110.0, 220.0, 10.0, 20.0],
                   "format_ok": True, "error": None, "box_problem": "inverted"}
    assert parse_json_line(json.dumps({"id": 3, "text": 5}), "vlm_r1", "bare_list")["id"] == 3
