"""The one generation path (medloc/generation.py) on the tiny Qwen2.5-VL, CPU, fp32.

- Same seed -> the same samples as transformers' ``generate`` on the G-times repeated prompts
  (vision per row, prompt per row, its own cache), for the static and the dynamic cache, with and
  without top-p: vision once per image, the shared prompt prefix and the sampler change no token.
- The log-probability of each sampled token as the sampler saw it equals the training forward's
  (``completion_logprobs``), with and without reusing the sampler's image features.
- Rows stop at EOS (pad after it) and the output is as long as the longest row, as with
  ``generate``; vision tokens are never produced.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from medloc.data.collate import append_completions, encode_prompts, model_inputs, repeat_prompts
from medloc.data.prompts import build_messages
from medloc.generation import generate, rows_features, sequence_positions
from medloc.models.loading import load_model, vision_token_ids
from medloc.models.logprobs import completion_logprobs

G = 4


def _prompts(processor):
    rng = np.random.default_rng(1)
    images = [
        Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)),  # H=112, W=112
        Image.fromarray(rng.integers(0, 256, (90, 140, 3), dtype=np.uint8)),  # H=90, W=140
    ]
    messages = [  # different lengths: the first prompt is left-padded
        build_messages("the skin lesion", images[0], "bare_list"),
        build_messages("the small dark nodule in the left lobe", images[1], "bare_list"),
    ]
    return encode_prompts(processor, images, messages)


def _ours(model, processor, batch, *, cache="static", top_p=1.0, max_new_tokens=16, seed=0,
          do_sample=True):
    tok = processor.tokenizer
    torch.manual_seed(seed)
    return generate(model, batch, num_samples=G, max_new_tokens=max_new_tokens,
                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                    banned_token_ids=vision_token_ids(processor), do_sample=do_sample,
                    temperature=0.9, top_p=top_p, cache=cache)


def _hf(model, processor, batch, *, top_p=1.0, max_new_tokens=16, seed=0):
    tok = processor.tokenizer
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            **model_inputs(repeat_prompts(batch, G)), do_sample=True, temperature=0.9,
            top_p=top_p, top_k=0, max_new_tokens=max_new_tokens, repetition_penalty=1.0,
            bad_words_ids=[[i] for i in vision_token_ids(processor)],
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )
    return out[:, batch["input_ids"].shape[1]:]  # [B*G, L]


@pytest.fixture(scope="module")
def warm_model(warm_start_dir):
    """The warm-started tiny model: it answers in the format and stops at <|im_end|>."""
    return load_model(warm_start_dir, dtype="float32", attn_implementation="sdpa")


@pytest.mark.parametrize("cache", ["static", "dynamic"])
@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_same_samples_as_generate(processor, model, cache, top_p):
    batch = _prompts(processor)
    ours = _ours(model, processor, batch, cache=cache, top_p=top_p)
    assert ours.completion_ids.shape == (2 * G, 16)  # a random model never stops early
    assert torch.equal(ours.completion_ids, _hf(model, processor, batch, top_p=top_p))
    assert not torch.isin(ours.completion_ids, torch.tensor(vision_token_ids(processor))).any()
    # another seed gives other samples (the draw is random, not greedy)
    assert not torch.equal(ours.completion_ids,
                           _ours(model, processor, batch, cache=cache, top_p=top_p,
                                 seed=1).completion_ids)


def test_eager_attention_samples_as_generate(processor, tiny_dir):
    """The static cache's direct decode-layer loop builds sdpa's boolean mask; with eager attention
    (an additive float mask) generation takes the language model's own forward instead, and still
    draws what ``generate`` draws."""
    eager = load_model(tiny_dir, dtype="float32", attn_implementation="eager")
    batch = _prompts(processor)
    tok = processor.tokenizer
    ours = _ours(eager, processor, batch)
    assert torch.equal(ours.completion_ids, _hf(eager, processor, batch))
    full = append_completions(batch, ours.completion_ids, pad_id=tok.pad_token_id,
                              eos_id=tok.eos_token_id, repeat=G)
    with torch.no_grad():
        forward = completion_logprobs(eager, full, temperature=0.9,
                                      suppress_token_ids=vision_token_ids(processor))
    mask = full["completion_mask"].bool()
    torch.testing.assert_close(forward[mask], ours.logprobs[mask], atol=5e-6, rtol=0)


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_rows_stop_at_eos_like_generate(processor, warm_model, cache):
    batch = _prompts(processor)
    tok = processor.tokenizer
    ours = _ours(warm_model, processor, batch, cache=cache, max_new_tokens=40)
    ids = ours.completion_ids  # [N, L]
    is_eos = ids == tok.eos_token_id
    assert is_eos.any(dim=1).all(), "the warm-started model should end every answer"
    assert ids.shape[1] < 40  # stopped once every row had its EOS, not at max_new_tokens
    first = is_eos.int().argmax(dim=1)  # [N]
    assert int(first.max()) == ids.shape[1] - 1  # as long as the longest row, no longer
    for row, f in enumerate(first.tolist()):
        assert (ids[row, f + 1:] == tok.pad_token_id).all()
        assert (ours.logprobs[row, f + 1:] == 0).all()
    assert torch.equal(ids, _hf(warm_model, processor, batch, max_new_tokens=40))


def test_sampler_logprobs_equal_the_training_forward(processor, warm_model):
    """What the sampler drew from is what the update differentiates: the same log-prob for
    every kept token, also when the forward reuses the sampler's image features instead of running
    the vision tower. fp32 rounding: measured max difference 2.1e-6 (static cache) and 2.0e-6
    (dynamic), the same as transformers' own generate() logits against this forward (2.0e-6)."""
    batch = _prompts(processor)
    tok = processor.tokenizer
    ours = _ours(warm_model, processor, batch, max_new_tokens=40)
    full = append_completions(batch, ours.completion_ids, pad_id=tok.pad_token_id,
                              eos_id=tok.eos_token_id, repeat=G)
    mask = full["completion_mask"].bool()  # [N, L]
    banned = vision_token_ids(processor)
    with torch.no_grad():
        forward = completion_logprobs(warm_model, full, temperature=0.9,
                                      suppress_token_ids=banned)  # [N, L]
        reused = completion_logprobs(
            warm_model, full, temperature=0.9, suppress_token_ids=banned,
            image_features=rows_features(ours.image_features, range(2 * G), G))
    assert mask.sum() >= 2 * G * 5
    torch.testing.assert_close(forward[mask], ours.logprobs[mask], atol=5e-6, rtol=0)
    torch.testing.assert_close(reused, forward, atol=1e-6, rtol=0)
    # the check can fail: a wrong temperature moves the log-probs far beyond the tolerance
    with torch.no_grad():
        wrong = completion_logprobs(warm_model, full, temperature=1.0, suppress_token_ids=banned)
    assert (wrong[mask] - ours.logprobs[mask]).abs().max() > 1e-3


def test_sequence_positions_are_what_the_forward_computes(processor, warm_model):
    """The M-RoPE positions the rollout hands to the update's forwards (prompt positions from the
    sampler, extended over the completions) equal ``get_rope_index`` on the prompt+completion
    batch, padding and the tokens after EOS included (rows of different lengths); passing them
    gives the same log-probs, bit for bit, as letting the forward compute them."""
    batch = _prompts(processor)
    tok = processor.tokenizer
    ours = _ours(warm_model, processor, batch, max_new_tokens=40)
    full = append_completions(batch, ours.completion_ids, pad_id=tok.pad_token_id,
                              eos_id=tok.eos_token_id, repeat=G)
    lengths = full["completion_mask"].sum(1)
    assert lengths.min() < lengths.max() < full["completion_mask"].shape[1] + 1
    positions = sequence_positions(ours.prompt_positions, ours.next_positions,
                                   full["completion_mask"], G)  # [N, 3, P+L]
    expected, _ = warm_model.model.get_rope_index(
        full["input_ids"], mm_token_type_ids=full["mm_token_type_ids"],
        image_grid_thw=full["image_grid_thw"], attention_mask=full["attention_mask"])
    assert torch.equal(positions, expected.permute(1, 0, 2))
    banned = vision_token_ids(processor)
    with torch.no_grad():
        computed = completion_logprobs(warm_model, full, temperature=0.9, suppress_token_ids=banned)
        passed = completion_logprobs(warm_model, {**full, "position_ids": positions},
                                     temperature=0.9, suppress_token_ids=banned)
    assert torch.equal(passed, computed)


def test_greedy_takes_the_argmax_and_matches_the_forward(processor, warm_model):
    batch = _prompts(processor)
    tok = processor.tokenizer
    ours = _ours(warm_model, processor, batch, max_new_tokens=40, do_sample=False)
    ids = ours.completion_ids
    assert all(torch.equal(ids[r], ids[r - r % G]) for r in range(ids.shape[0]))  # G equal rows
    full = append_completions(batch, ids, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                              repeat=G)
    mask = full["completion_mask"].bool()
    with torch.no_grad():
        logits = warm_model(**model_inputs(full)).logits[:, -ids.shape[1] - 1:-1]  # [N, L, V]
    logits[..., vision_token_ids(processor)] = float("-inf")
    assert torch.equal(logits.argmax(-1)[mask], ids[mask])


def test_bad_arguments_are_refused(processor, model):
    batch = _prompts(processor)
    tok = processor.tokenizer
    kw = {"num_samples": 2, "max_new_tokens": 4, "eos_token_id": tok.eos_token_id,
              "pad_token_id": tok.pad_token_id}
    with pytest.raises(ValueError, match="cache='paged'"):
        generate(model, batch, cache="paged", **kw)
    with pytest.raises(ValueError, match="compile_decode=True needs cache='static'"):
        generate(model, batch, cache="dynamic", compile_decode=True, **kw)


@pytest.mark.slow
def test_compiled_decode_draws_the_same_samples(processor, model):
    """grpo.compile_decode=true: the decode step through torch.compile (inductor on CPU, CUDA
    graphs on a GPU) draws the same tokens with the same log-probs (measured: equal tokens,
    log-probs within 4.8e-7), and a second call reuses the compiled step. The first call compiles
    (~1-2.5 min on 2 CPU cores), hence `slow`."""
    batch = _prompts(processor)
    tok = processor.tokenizer

    def run(compile_decode: bool):
        torch.manual_seed(0)
        return generate(model, batch, num_samples=G, max_new_tokens=16,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                        banned_token_ids=vision_token_ids(processor), temperature=0.9,
                        compile_decode=compile_decode)

    eager = run(False)
    for _ in range(2):
        compiled = run(True)
        assert torch.equal(compiled.completion_ids, eager.completion_ids)
        torch.testing.assert_close(compiled.logprobs, eager.logprobs, atol=2e-6, rtol=0)
