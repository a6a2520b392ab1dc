"""Prompt and answer text for referring-expression grounding (docs/method.md §1).

The policy sees one image and one text turn. The text is a question naming the finding followed by
a suffix that says how to answer. Two answer formats exist (`AnswerFormat`):

- ``"vlm_r1_json"`` (the paper): ``<think>...</think><answer>{"bbox_2d": [x1, y1, x2, y2]}</answer>``
- ``"bare_list"`` (the tiny embedded model): ``<answer>[x1,y1,x2,y2]</answer>``, a short answer
  that a ~1M-parameter model can learn in minutes (every digit is one token, ~16 answer tokens).

Coordinates in answers are integers in the MODEL-INPUT frame (the image after Qwen2.5-VL's
``smart_resize``), as Qwen2.5-VL was trained to answer. Mapping to the original image frame is
`medloc.boxes`'s job, not this module's.

Nothing here touches a tokenizer: these functions produce chat *messages* and answer *strings*;
`medloc.data.collate` turns them into tensors through the processor's chat template.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any, Literal, get_args

AnswerFormat = Literal["vlm_r1_json", "bare_list"]

# ASSUMED (docs/method.md §1): the VLM-R1 REC question; MedLoc-R1 says it builds on VLM-R1 but does not
# print its prompt. `{query}` is the record's finding, e.g. "the skin lesion".
REC_QUESTION_TEMPLATE = (
    "Please provide the bounding box coordinate of the region this sentence describes: {query}."
)

# ASSUMED (docs/method.md §1): the VLM-R1 think/answer suffix, appended after one space.
THINK_ANSWER_SUFFIX = (
    "First output the thinking process in <think> </think> tags and then output the final answer "
    "in <answer> </answer> tags. Output the final answer in JSON format."
)

# Deviation for the tiny embedded model (not in the paper): ask for the short bare-list answer.
# Kept short on purpose: the whole tiny prompt (chat scaffold + 16 image tokens + text) is ~60 tokens.
BARE_LIST_SUFFIX = "Answer as <answer>[x1,y1,x2,y2]</answer>."


def check_answer_format(answer_format: str) -> AnswerFormat:
    """Return `answer_format` unchanged if it is one of `AnswerFormat`, else raise ValueError."""
    allowed = get_args(AnswerFormat)
    if answer_format not in allowed:
        raise ValueError(f"answer_format={answer_format!r} is not one of {list(allowed)}")
    return answer_format  # type: ignore[return-value]


def default_suffix(answer_format: AnswerFormat) -> str:
    """The instruction appended to the question for `answer_format` (docs/method.md §1 for vlm_r1_json)."""
    if answer_format == "vlm_r1_json":
        return THINK_ANSWER_SUFFIX
    elif answer_format == "bare_list":
        return BARE_LIST_SUFFIX
    else:
        check_answer_format(answer_format)
        raise AssertionError("unreachable")


def build_prompt_text(
    query: str,
    answer_format: AnswerFormat,
    *,
    question_template: str = REC_QUESTION_TEMPLATE,
    suffix: str | None = None,
) -> str:
    """The user-turn text: ``question_template.format(query=query) + " " + suffix`` (docs/method.md §1).

    `suffix=None` means `default_suffix(answer_format)`; pass `""` for no suffix (no trailing space).
    """
    check_answer_format(answer_format)
    if not isinstance(query, str) or not query.strip():
        raise ValueError(f"query must be a non-empty string, got {query!r}")
    if "{query}" not in question_template:
        raise ValueError(f"question_template must contain '{{query}}', got {question_template!r}")
    question = question_template.format(query=query)
    tail = default_suffix(answer_format) if suffix is None else suffix
    return f"{question} {tail}" if tail else question


def build_messages(
    query: str,
    image: Any,
    answer_format: AnswerFormat,
    *,
    question_template: str = REC_QUESTION_TEMPLATE,
    suffix: str | None = None,
) -> list[dict[str, Any]]:
    """Chat messages for one grounding prompt: one user turn holding one image, then the text.

    The result is what a Qwen2.5-VL processor's chat template expects
    (``processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)``);
    `image` is stored as given (a PIL image or a path) and only its position matters to the template.
    No system turn is added: the Qwen2.5-VL template inserts its default system prompt itself.
    """
    text = build_prompt_text(
        query, answer_format, question_template=question_template, suffix=suffix
    )
    return [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": image},
                {"type": "text", "text": text},
            ],
        }
    ]


def _integer_box(box: Sequence[float]) -> list[int]:
    """Round a 4-number box to the nearest integers, halves up (``floor(v + 0.5)``)."""
    if len(box) != 4:
        raise ValueError(f"box must have 4 numbers [x1, y1, x2, y2], got {list(box)!r}")
    out = []
    for v in box:
        fv = float(v)
        if not math.isfinite(fv):
            raise ValueError(f"box coordinates must be finite, got {list(box)!r}")
        out.append(math.floor(fv + 0.5))
    return out


def format_answer(
    box_model_frame: Sequence[float],
    answer_format: AnswerFormat,
    think_text: str = "",
) -> str:
    """The target answer text for a box given in MODEL-INPUT pixels (docs/method.md §1).

    - ``"bare_list"``: ``<answer>[x1,y1,x2,y2]</answer>`` (no spaces; `think_text` must be empty).
    - ``"vlm_r1_json"``: ``<think>{think_text}</think><answer>{"bbox_2d": [x1, y1, x2, y2]}</answer>``.

    Coordinates are rounded to the nearest integer, halves up (20.5 -> 21). The chat turn's closing ``<|im_end|>`` is
    not part of the answer: `medloc.data.collate` appends it.
    """
    check_answer_format(answer_format)
    x1, y1, x2, y2 = _integer_box(box_model_frame)
    if answer_format == "bare_list":
        if think_text:
            raise ValueError("answer_format='bare_list' has no <think> block; pass think_text=''")
        return f"<answer>[{x1},{y1},{x2},{y2}]</answer>"
    elif answer_format == "vlm_r1_json":
        payload = json.dumps({"bbox_2d": [x1, y1, x2, y2]})
        return f"<think>{think_text}</think><answer>{payload}</answer>"
    else:
        raise AssertionError("unreachable")
