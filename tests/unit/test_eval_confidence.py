"""medloc.metrics.answer_confidence / answer_token_mask: the COCO AP confidence of a box is the
geometric mean of its answer tokens' probabilities, hand-worked on constructed token lists."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medloc.metrics import answer_confidence, answer_token_mask

TOKENS = ["<think>", "look", "</think>", "<answer>", "[1", ",", "2", "]", "</answer>", "<|im_end|>"]
LOGP = [-5.0, -4.0, -3.0, -0.1, -0.2, -0.3, -0.4, -0.5, -0.6, -0.7]


def test_only_the_answer_body_counts():
    # Body "[1,2]" = tokens 4..7: mean log-prob -(0.2 + 0.3 + 0.4 + 0.5) / 4 = -0.35,
    # confidence exp(-0.35) = 0.704688. (The whole completion: -14.8 / 10 -> exp(-1.48) = 0.2276.)
    mask = answer_token_mask([TOKENS], len(TOKENS))
    assert mask[0].tolist() == [False] * 4 + [True] * 4 + [False] * 2
    conf = answer_confidence(np.array([LOGP]), [TOKENS])
    assert conf.shape == (1,) and conf.dtype == np.float64
    assert conf[0] == pytest.approx(math.exp(-0.35), rel=1e-12)


def test_padding_is_ignored_and_torch_input_works():
    # Row 0 as above padded to L = 12 with junk; row 1 has 3 tokens, no tags -> whole completion:
    # -(1 + 2 + 3) / 3 = -2.
    logp = torch.tensor([LOGP + [7.0, 7.0], [-1.0, -2.0, -3.0] + [9.0] * 9], dtype=torch.float32)
    conf = answer_confidence(logp, [TOKENS, ["a", "b", "c"]])
    assert conf[0] == pytest.approx(math.exp(-0.35), rel=1e-6)  # float32 input
    assert conf[1] == pytest.approx(math.exp(-2.0), rel=1e-6)


def test_tokens_that_merge_a_tag_with_the_body():
    # Text "<answer>[3]</answer>" tokenised as "<answer" | ">[" | "3" | "]</" | "answer>":
    # body "[3]" = chars 8..10, overlapped by tokens 1, 2, 3; tokens 0 and 4 are pure tag.
    pieces = ["<answer", ">[", "3", "]</", "answer>"]
    assert answer_token_mask([pieces], 6)[0].tolist() == [False, True, True, True, False, False]
    # An empty-text token inside the body (offset 9; body "78" = chars 8 and 9) counts; one at the
    # body's end (offset 10, where "</answer>" starts) or after the block does not.
    pieces = ["<answer>", "7", "", "8", "", "</answer>", ""]
    assert answer_token_mask([pieces], 7)[0].tolist() == [False, True, True, True, False, False,
                                                           False]


def test_first_answer_block_and_fallbacks():
    # Two blocks: only the first one's body (token 1, log-prob -1) counts -> exp(-1).
    pieces = ["<answer>", "[1]", "</answer>", "<answer>", "[2]", "</answer>"]
    logp = np.array([[-9.0, -1.0, -9.0, -9.0, -5.0, -9.0]])
    assert answer_confidence(logp, [pieces])[0] == pytest.approx(math.exp(-1.0), rel=1e-12)
    # No complete block (unclosed, or empty body): the mean over all real tokens.
    for pieces in (["<answer>", "[1", "2]"], ["<answer>", "</answer>", "x"]):
        assert not answer_token_mask([pieces], 3).any()
        conf = answer_confidence(np.array([[-1.0, -2.0, -6.0]]), [pieces])
        assert conf[0] == pytest.approx(math.exp(-3.0), rel=1e-12)  # -(1 + 2 + 6) / 3
    # A row with no tokens at all: NaN.
    assert math.isnan(answer_confidence(np.zeros((1, 4)), [[]])[0])


def test_errors():
    with pytest.raises(ValueError, match=r"\[n=2, L\]"):
        answer_confidence(np.zeros((1, 3)), [["a"], ["b"]])
    with pytest.raises(ValueError, match="3 token texts but length is 2"):
        answer_token_mask([["a", "b", "c"]], 2)
