"""Unit tests for medloc.data.prompts: the REC prompt text (docs/method.md §1), chat messages, answers.

Expected strings are written out by hand; no tokenizer or model is involved.
"""

from __future__ import annotations

import json

import pytest

from medloc.data.prompts import (
    BARE_LIST_SUFFIX,
    REC_QUESTION_TEMPLATE,
    THINK_ANSWER_SUFFIX,
    build_messages,
    build_prompt_text,
    check_answer_format,
    default_suffix,
    format_answer,
)

PAPER_QUESTION = (
    "Please provide the bounding box coordinate of the region this sentence describes: "
    "the skin lesion."
)
PAPER_SUFFIX = (
    "First output the thinking process in <think> </think> tags and then output the final answer "
    "in <answer> </answer> tags. Output the final answer in JSON format."
)


def test_paper_prompt_text_is_question_space_suffix():
    # docs/method.md §1: "{question} First output the thinking process ... in JSON format."
    text = build_prompt_text("the skin lesion", "vlm_r1_json")
    assert text == PAPER_QUESTION + " " + PAPER_SUFFIX
    assert THINK_ANSWER_SUFFIX == PAPER_SUFFIX
    assert REC_QUESTION_TEMPLATE.format(query="the skin lesion") == PAPER_QUESTION


def test_bare_list_prompt_asks_for_the_bare_list_form():
    text = build_prompt_text("the thyroid nodule", "bare_list")
    assert text == (
        "Please provide the bounding box coordinate of the region this sentence describes: "
        "the thyroid nodule. Answer as <answer>[x1,y1,x2,y2]</answer>."
    )
    assert default_suffix("bare_list") == BARE_LIST_SUFFIX


def test_prompt_parameters_override_the_defaults():
    assert build_prompt_text("x", "bare_list", question_template="Find {query}.", suffix="Go.") == (
        "Find x. Go."
    )
    # an empty suffix leaves no trailing space
    assert build_prompt_text("x", "vlm_r1_json", question_template="Find {query}.", suffix="") == (
        "Find x."
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"query": "", "answer_format": "bare_list"}, "query"),
        ({"query": "   ", "answer_format": "bare_list"}, "query"),
        ({"query": "a", "answer_format": "json"}, "answer_format='json'"),
        ({"query": "a", "answer_format": "bare_list", "question_template": "no slot"}, "{query}"),
    ],
)
def test_prompt_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_prompt_text(**kwargs)


def test_check_answer_format_names_allowed_values():
    assert check_answer_format("bare_list") == "bare_list"
    with pytest.raises(ValueError, match=r"\['vlm_r1_json', 'bare_list'\]"):
        check_answer_format("xml")


def test_build_messages_is_one_user_turn_image_then_text():
    image = object()  # any object: the template only needs to see an "image" entry
    messages = build_messages("the heel", image, "bare_list")
    assert messages == [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": image},
                {"type": "text", "text": build_prompt_text("the heel", "bare_list")},
            ],
        }
    ]
    assert messages[0]["content"][0]["image"] is image


def test_format_answer_bare_list_rounds_halves_up():
    # 10.4 -> 10, 20.5 -> 21 (halves up), 30.6 -> 31, 40.5 -> 41
    assert format_answer([10.4, 20.5, 30.6, 40.5], "bare_list") == "<answer>[10,21,31,41]</answer>"
    # integers stay as they are, no spaces
    assert format_answer((0, 7, 112, 99), "bare_list") == "<answer>[0,7,112,99]</answer>"


def test_format_answer_vlm_r1_json_matches_paper_form():
    text = format_answer([1.0, 2.49, 3.5, 4.51], "vlm_r1_json", think_text="dark spot")
    # 1.0 -> 1, 2.49 -> 2, 3.5 -> 4, 4.51 -> 5
    assert text == '<think>dark spot</think><answer>{"bbox_2d": [1, 2, 4, 5]}</answer>'
    inner = text.split("<answer>")[1].split("</answer>")[0]
    assert json.loads(inner) == {"bbox_2d": [1, 2, 4, 5]}
    assert format_answer([1, 2, 3, 4], "vlm_r1_json") == (
        '<think></think><answer>{"bbox_2d": [1, 2, 3, 4]}</answer>'
    )


@pytest.mark.parametrize(
    "box, fmt, think, match",
    [
        ([1, 2, 3], "bare_list", "", "4 numbers"),
        ([1, 2, 3, float("nan")], "bare_list", "", "finite"),
        ([1, 2, 3, float("inf")], "vlm_r1_json", "", "finite"),
        ([1, 2, 3, 4], "bare_list", "thought", "think"),
        ([1, 2, 3, 4], "list", "", "answer_format='list'"),
    ],
)
def test_format_answer_rejects_bad_input(box, fmt, think, match):
    with pytest.raises(ValueError, match=match):
        format_answer(box, fmt, think_text=think)
