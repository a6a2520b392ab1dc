"""Integration tests for medloc.data.collate with the tiny Qwen2.5-VL processor and model:
left-padded prompt batches (mm_token_type_ids, model-input sizes), repetition of prompts,
completion masks (hand-worked), prompt+completion batches whose forward log-probs match the
sampler's (fp32, within 1e-4) - and do NOT match without mm_token_type_ids, the transformers 5.x
pitfall - and SFT labels (-100 on prompt and padding; answer + <|im_end|> supervised).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from medloc.data.collate import (
    IGNORE_INDEX,
    append_completions,
    completion_mask_from_ids,
    encode_prompts,
    encode_sft,
    model_inputs,
    repeat_prompts,
)
from medloc.data.prompts import build_messages, format_answer
from medloc.models.loading import vision_token_ids

torch.set_num_threads(1)


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(1)
    return [
        Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)),  # H=112, W=112
        Image.fromarray(rng.integers(0, 256, (90, 140, 3), dtype=np.uint8)),  # H=90, W=140
    ]


def _messages(images):
    return [
        build_messages("the skin lesion", images[0], "bare_list"),
        build_messages("the small dark nodule in the left lobe", images[1], "bare_list"),
    ]


def _token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token]: [N, L, V], [N, L] -> [N, L]."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


# ---------------------------------------------------------------- prompt batches


def test_encode_prompts_left_pads_and_reports_model_input_sizes(processor):
    images = _images()
    batch = encode_prompts(processor, images, _messages(images))
    # 112x112 stays 112x112; 90x140: round(90/28)=3 -> 84, round(140/28)=5 -> 140,
    # 84*140 = 11,760 <= max_pixels 12,544, so (h, w) = (84, 140)
    assert batch["input_hw"].tolist() == [[112, 112], [84, 140]]
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8], [1, 6, 10]]
    # image tokens: 8*8/4 = 16 and 6*10/4 = 15; patches: 64 + 60 = 124 rows of 3*2*14*14 = 1176
    assert batch["mm_token_type_ids"].sum(dim=1).tolist() == [16, 15]
    assert batch["pixel_values"].shape == (124, 1176)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert torch.equal(batch["mm_token_type_ids"] == 1, ids == image_id)
    # left padding: every row ends with the assistant header, pads only at the start
    header = processor.tokenizer("<|im_start|>assistant\n")["input_ids"]
    assert ids[:, -len(header) :].tolist() == [header, header]
    lengths = mask.sum(dim=1)
    assert lengths.max() == ids.shape[1]
    for row in range(2):
        n_pad = ids.shape[1] - int(lengths[row])
        assert mask[row, :n_pad].sum() == 0 and mask[row, n_pad:].all()
        assert (ids[row, :n_pad] == processor.tokenizer.pad_token_id).all()
    assert set(model_inputs(batch)) == {
        "input_ids",
        "attention_mask",
        "mm_token_type_ids",
        "pixel_values",
        "image_grid_thw",
    }


def test_encode_prompts_rejects_mismatched_inputs(processor):
    images = _images()
    with pytest.raises(ValueError, match="2 images for 1 prompts"):
        encode_prompts(processor, images, _messages(images)[:1])


def test_repeat_prompts_keeps_copies_adjacent_and_repeats_each_images_patches(processor):
    images = _images()
    batch = encode_prompts(processor, images, _messages(images))
    rep = repeat_prompts(batch, 3)
    assert rep["input_ids"].shape[0] == 6
    assert torch.equal(rep["input_ids"][0], rep["input_ids"][2])
    assert torch.equal(rep["input_ids"][3], batch["input_ids"][1])
    # patches: image 0 has 64, image 1 has 60 -> [64, 64, 64, 60, 60, 60]
    pv, p0, p1 = rep["pixel_values"], batch["pixel_values"][:64], batch["pixel_values"][64:]
    assert pv.shape[0] == 3 * 64 + 3 * 60
    assert torch.equal(pv[128:192], p0) and torch.equal(pv[192:252], p1)
    assert rep["input_hw"].tolist() == [[112, 112]] * 3 + [[84, 140]] * 3
    with pytest.raises(ValueError, match="repeat"):
        repeat_prompts(batch, 0)


# ---------------------------------------------------------------- completion batches


def test_completion_mask_hand_worked():
    eos, other_eos = 9, 8
    ids = torch.tensor(
        [
            [5, 9, 7, 9],  # first EOS at 1 -> 1 1 0 0
            [5, 6, 7, 4],  # no EOS (truncated) -> all ones
            [9, 1, 9, 2],  # EOS first -> 1 0 0 0
            [3, 8, 9, 2],  # with eos list (9, 8): first EOS is the 8 at 1 -> 1 1 0 0
        ]
    )
    assert completion_mask_from_ids(ids, eos).tolist() == [
        [1, 1, 0, 0],
        [1, 1, 1, 1],
        [1, 0, 0, 0],
        [1, 1, 1, 0],  # with eos=9 only, row 3's first EOS is at 2
    ]
    assert completion_mask_from_ids(ids, [eos, other_eos])[3].tolist() == [1, 1, 0, 0]


def test_append_completions_layout(processor):
    images = _images()
    prompts = encode_prompts(processor, images, _messages(images))
    pad, eos = 0, 7
    comp = torch.tensor([[4, 7, 5], [4, 4, 4], [7, 3, 3], [1, 2, 7]])  # [B*G=4, L=3], G=2
    out = append_completions(prompts, comp, pad_id=pad, eos_id=eos, repeat=2)
    P = prompts["input_ids"].shape[1]
    assert out["input_ids"].shape == (4, P + 3)
    # tokens after the first EOS become pad and are masked
    assert out["input_ids"][:, P:].tolist() == [[4, 7, 0], [4, 4, 4], [7, 0, 0], [1, 2, 7]]
    assert out["completion_mask"].tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]]
    assert torch.equal(out["attention_mask"][:, P:], out["completion_mask"])
    assert torch.equal(out["attention_mask"][2, :P], prompts["attention_mask"][1])
    assert out["mm_token_type_ids"][:, P:].sum() == 0
    assert torch.equal(
        out["mm_token_type_ids"][:, :P], repeat_prompts(prompts, 2)["mm_token_type_ids"]
    )
    with pytest.raises(ValueError, match=r"\[N=4, L\]"):
        append_completions(prompts, comp[:3], pad_id=pad, eos_id=eos, repeat=2)


def test_forward_logprobs_match_the_samplers(processor, model):
    """Sample with temperature (vision tokens suppressed), then recompute the sampled tokens'
    log-probs with one forward on the prompt+completion batch: they must agree with the logits the
    sampler saw, step by step, within 1e-4 in fp32. Without mm_token_type_ids the forward puts the
    image tokens at 1-D text positions and the agreement breaks."""
    images = _images()
    prompts = encode_prompts(processor, images, _messages(images))
    G, L = 4, 16
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(
            **model_inputs(prompts),
            do_sample=True,
            temperature=0.9,
            top_k=0,
            top_p=1.0,
            max_new_tokens=L,
            num_return_sequences=G,
            suppress_tokens=vision_token_ids(processor),
            output_logits=True,
            return_dict_in_generate=True,
        )
    P = prompts["input_ids"].shape[1]
    completions = out.sequences[:, P:]  # [B*G, L']
    L = completions.shape[1]
    sampler_logp = _token_logprobs(torch.stack(out.logits, dim=1), completions)  # [B*G, L]

    gen = model.generation_config
    batch = append_completions(
        prompts, completions, pad_id=gen.pad_token_id, eos_id=gen.eos_token_id, repeat=G
    )
    mask = batch["completion_mask"].bool()  # [B*G, L]
    with torch.no_grad():
        logits = model(**model_inputs(batch)).logits[:, -L - 1 : -1]  # [B*G, L, V]
    forward_logp = _token_logprobs(logits, batch["input_ids"][:, -L:])
    assert mask.sum() >= 8 * 2
    torch.testing.assert_close(forward_logp[mask], sampler_logp[mask], atol=1e-4, rtol=0)

    # the same forward with logits_to_keep=L+1 (cheaper) gives the same numbers
    with torch.no_grad():
        kept = model(**model_inputs(batch), logits_to_keep=L + 1).logits[:, :-1]
    torch.testing.assert_close(_token_logprobs(kept, batch["input_ids"][:, -L:]), forward_logp)

    inputs = model_inputs(batch)
    del inputs["mm_token_type_ids"]
    with torch.no_grad():
        wrong = model(**inputs).logits[:, -L - 1 : -1]
    wrong_logp = _token_logprobs(wrong, batch["input_ids"][:, -L:])
    assert (wrong_logp[mask] - sampler_logp[mask]).abs().max() > 1e-3


# ---------------------------------------------------------------- SFT


def test_sft_labels_supervise_answer_and_im_end_only(processor, model):
    images = _images()
    answers = [
        format_answer([10, 20, 30, 40], "bare_list"),  # <answer>[10,20,30,40]</answer>
        format_answer([5, 6, 70, 80.4], "bare_list"),  # <answer>[5,6,70,80]</answer>
    ]
    batch = encode_sft(processor, images, _messages(images), answers)
    tok = processor.tokenizer
    labels, ids = batch["labels"], batch["input_ids"]
    answer_ids = [
        tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for a in answers
    ]
    # <answer>[10,20,30,40]</answer> has 8 digits, the other 6: row 0 is 2 tokens longer
    assert len(answer_ids[0]) == len(answer_ids[1]) + 2
    L = len(answer_ids[0])
    P = ids.shape[1] - L
    assert (labels[:, :P] == IGNORE_INDEX).all()
    for row in range(2):
        supervised = labels[row][labels[row] != IGNORE_INDEX].tolist()
        assert supervised == answer_ids[row]
        assert tok.decode(supervised) == answers[row] + "<|im_end|>"
        # supervised tokens start right after the prompt's assistant header
        assert labels[row, P] == answer_ids[row][0]
    assert (labels[1, P + L - 2 :] == IGNORE_INDEX).all()  # right padding of the shorter answer
    assert batch["completion_mask"].sum(dim=1).tolist() == [L, L - 2]

    # the HF loss equals the mean NLL of the supervised tokens computed by hand
    with torch.no_grad():
        out = model(**model_inputs(batch), labels=labels)
    logp = _token_logprobs(out.logits[:, -L - 1 : -1], ids[:, -L:])  # [B, L]
    mask = batch["completion_mask"].bool()
    torch.testing.assert_close(out.loss, -logp[mask].mean(), atol=1e-5, rtol=1e-5)


def test_sft_rejects_answer_containing_eos(processor):
    images = _images()
    with pytest.raises(ValueError, match="contains the EOS"):
        encode_sft(processor, images, _messages(images), ["a<|im_end|>b", "c"])
