"""Generation is right under every attention implementation transformers offers for Qwen2.5-VL:
sdpa, eager and flash_attention_2 (flash-attn has no CPU build: transformers' own FA2 path runs
with the two kernels emulated in pure torch, ``tests/fa2_emulation.py``).

- The emulated kernels keep flash-attn's contract (bottom-right causal alignment per sequence,
  zero output for a query with no key, grouped-query heads), checked against an explicit masked
  softmax attention.
- transformers' FA2 mask contract, shown directly: a static-cache prefill handed a mask of ones
  over all K cache slots (what ``medloc.generation`` did at 62cf3b8) attends to later prompt
  tokens and empty slots under FA2, while sdpa hides them by causality.
- Under each implementation, with the static and the dynamic cache, on left-padded prompts of
  different lengths and completions that stop at different lengths (so the training forward
  has right padding too), ``medloc.generation.generate`` draws what ``model.generate`` draws for
  the same seed, and its log-probs equal the training forward's (``completion_logprobs``). On
  62cf3b8's generation.py the flash_attention_2 static-cache case fails (measured: 6 of 8 rows
  sample other tokens, log-probs off by up to 0.29 on the random tiny model).
- Flash attention takes the direct decode-layer loop with the static cache: bit for bit the
  language model's forward.
- ``attn_implementation: auto`` resolves only to an implementation covered here.
- The compiled decode step is keyed by what changes its graph.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from PIL import Image

from medloc import generation
from medloc.data.collate import append_completions, encode_prompts, model_inputs, repeat_prompts
from medloc.data.prompts import build_messages
from medloc.generation import generate
from medloc.models.loading import load_model, resolve_attn_implementation, vision_token_ids
from medloc.models.logprobs import completion_logprobs
from tests import fa2_emulation

G = 4
# Every implementation transformers offers for this model that a run can select
# (model.attn_implementation); "flash_attention_2" runs as fa2_emulation.NAME.
IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


def _prompts(processor, rows: int = 2):
    """Two prompts of different lengths (left padding), or the first one alone (no padding: the
    flash path then drops the all-ones masks and runs the padded-batch kernel)."""
    rng = np.random.default_rng(1)
    images = [
        Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)),  # H=112, W=112
        Image.fromarray(rng.integers(0, 256, (90, 140, 3), dtype=np.uint8)),  # H=90, W=140
    ]
    messages = [  # different lengths: the first prompt is left-padded (70 and 77 tokens)
        build_messages("the skin lesion", images[0], "bare_list"),
        build_messages("the small dark nodule in the left lobe", images[1], "bare_list"),
    ]
    return encode_prompts(processor, images[:rows], messages[:rows])


@pytest.fixture(scope="module")
def emulated_fa2():
    with fa2_emulation.installed() as name:
        yield name


def _load(path, implementation: str):
    if implementation == "flash_attention_2":
        return fa2_emulation.use(load_model(path, dtype="float32", attn_implementation="sdpa"))
    return load_model(path, dtype="float32", attn_implementation=implementation)


def _reference_attention(q, k, v, *, causal: bool, scale: float):
    """Masked softmax attention of one sequence, q [Sq, Hq, D], k/v [Sk, Hk, D], bottom-right."""
    sq, sk, rep = q.shape[0], k.shape[0], q.shape[1] // k.shape[1]
    out = torch.zeros(sq, q.shape[1], v.shape[-1], dtype=torch.float64)
    for h in range(q.shape[1]):
        kh, vh = k[:, h // rep].double(), v[:, h // rep].double()
        for i in range(sq):
            keys = [j for j in range(sk) if not causal or j <= i + sk - sq]
            if keys:
                w = torch.softmax((q[i, h].double() @ kh[keys].T) * scale, dim=-1)
                out[i, h] = w @ vh[keys]
    return out.float()


# ---------------------------------------------------------------------------------------------
# the emulated kernels
# ---------------------------------------------------------------------------------------------


def test_emulated_kernels_keep_flash_attn_contract():
    """Bottom-right causal per sequence of a varlen batch (a query sees keys j <= i + k - q),
    zero for a query that sees no key, query head h on key/value head h // 2."""
    torch.manual_seed(0)
    lens_q, lens_k = [2, 5, 3], [5, 5, 1]  # longer keys (decode-like), equal, shorter
    hq, hk, d = 4, 2, 8
    q = torch.randn(sum(lens_q), hq, d)
    k = torch.randn(sum(lens_k), hk, d)
    v = torch.randn(sum(lens_k), hk, d)
    cu_q = torch.tensor([0, *itertools.accumulate(lens_q)], dtype=torch.int32)
    cu_k = torch.tensor([0, *itertools.accumulate(lens_k)], dtype=torch.int32)
    scale = 1 / math.sqrt(d)
    for causal in (True, False):
        out = fa2_emulation.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k),
                                                   causal=causal)
        for i in range(3):
            qs, ks = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
            ref = _reference_attention(q[qs], k[ks], v[ks], causal=causal, scale=scale)
            torch.testing.assert_close(out[qs], ref, atol=1e-5, rtol=0)
    # sequence 3: 3 queries, 1 key -> queries 0 and 1 see nothing (output 0), query 2 sees key 0
    out = fa2_emulation.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 5, causal=True)
    assert out[7:9].abs().max() == 0
    assert out[9].abs().max() > 0
    # the padded-batch kernel is the same rule per row
    qb, kb, vb = torch.randn(2, 3, hq, d), torch.randn(2, 6, hk, d), torch.randn(2, 6, hk, d)
    outb = fa2_emulation.flash_attn_func(qb, kb, vb, causal=True)
    for b in range(2):
        torch.testing.assert_close(
            outb[b], _reference_attention(qb[b], kb[b], vb[b], causal=True, scale=scale),
            atol=1e-5, rtol=0)
    with pytest.raises(NotImplementedError, match="dropout_p"):
        fa2_emulation.flash_attn_func(qb, kb, vb, dropout_p=0.1)
    with pytest.raises(ValueError, match="max_seqlen"):
        fa2_emulation.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 2, 5, causal=True)


def test_emulation_is_registered_and_removed(tiny_dir):
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.utils.generic import is_flash_attention_requested

    with fa2_emulation.installed() as name:
        model = _load(tiny_dir, "flash_attention_2")
        assert model.config.text_config._attn_implementation == name
        assert model.config.vision_config._attn_implementation == name
        assert is_flash_attention_requested(model.config.text_config)
        assert generation._flash_attention(model) and generation._fast_decode_ok(model)
    assert name not in AttentionInterface._global_mapping
    assert name not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping


# ---------------------------------------------------------------------------------------------
# the mask contract
# ---------------------------------------------------------------------------------------------


def _prefill_logits(model, batch, mask_slots: int | None):
    """Last-position logits of a static-cache prefill whose mask covers the prompt (None) or
    ``mask_slots`` slots with ones after the prompt (62cf3b8's form)."""
    device = next(model.parameters()).device
    ids, prompt_mask = batch["input_ids"], batch["attention_mask"]
    b, p = ids.shape
    k = p + 8
    kv = generation._new_cache(model, "static", k)
    feats = generation.image_features(model, batch)
    embeds = generation.prompt_embeddings(model, ids, feats)
    positions, _ = generation.prompt_positions(model, batch, device)
    mask = prompt_mask if mask_slots is None else torch.cat(
        [prompt_mask, prompt_mask.new_ones(b, mask_slots - p)], dim=1)
    return generation._lm_logits(model, embeds, mask, positions, kv)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_static_prefill_mask_contract(processor, tiny_dir, emulated_fa2, implementation):
    """A mask of ones over all K static-cache slots is harmless for sdpa and eager (causality
    hides the empty slots) but not for FA2: ``flash_attention_mask`` drops an all-ones mask, and
    the kernel then aligns the prompt's P queries bottom-right against all K slots (the first
    query sees the whole prompt and K-P empty slots)."""
    model = _load(tiny_dir, implementation)
    batch = _prompts(processor)
    with torch.no_grad():
        prompt = _prefill_logits(model, batch, None)
        all_slots = _prefill_logits(model, batch, batch["input_ids"].shape[1] + 8)
    gap = float((prompt - all_slots).abs().max())
    if implementation == "flash_attention_2":
        assert gap > 1e-2
    else:
        assert gap < 1e-5


# ---------------------------------------------------------------------------------------------
# the sampler under every implementation
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def warm_models(warm_start_dir, emulated_fa2):
    """The warm-started tiny model (it stops at <|im_end|> after answers of different lengths)
    under each implementation."""
    return {impl: _load(warm_start_dir, impl) for impl in IMPLEMENTATIONS}


def _sample(model, processor, batch, cache, max_new_tokens=40):
    tok = processor.tokenizer
    torch.manual_seed(0)
    return generate(model, batch, num_samples=G, max_new_tokens=max_new_tokens,
                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                    banned_token_ids=vision_token_ids(processor), temperature=0.9, cache=cache)


def _hf_sample(model, processor, batch, max_new_tokens=40):
    tok = processor.tokenizer
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(
            **model_inputs(repeat_prompts(batch, G)), do_sample=True, temperature=0.9,
            top_p=1.0, top_k=0, max_new_tokens=max_new_tokens, repetition_penalty=1.0,
            bad_words_ids=[[i] for i in vision_token_ids(processor)],
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )
    return out[:, batch["input_ids"].shape[1]:]  # [N, L]


@pytest.mark.parametrize("rows", [2, 1])
@pytest.mark.parametrize("cache", ["static", "dynamic"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_sampler_matches_generate_and_forward(processor, warm_models, implementation, cache, rows):
    """Same seed, same samples as ``generate``; log-probs equal to the training forward's within
    the tolerance of test_generation.py (5e-6, fp32), on completions of different lengths. The
    single-prompt batch gets 1e-5: one token differs by 6.2e-6 (at log-prob -4.09) or 6.5e-6 (at
    -0.68, on a fresh clone's warm start), the same value under all three implementations and both
    caches, i.e. fp32 rounding of an unpadded batch's forward, not attention (a mask bug moves
    log-probs by 1e-2 or more: test_static_prefill_mask_contract)."""
    model = warm_models[implementation]
    batch = _prompts(processor, rows)
    tok = processor.tokenizer
    ours = _sample(model, processor, batch, cache)
    assert torch.equal(ours.completion_ids, _hf_sample(model, processor, batch,
                                                       max_new_tokens=ours.completion_ids.shape[1]))
    full = append_completions(batch, ours.completion_ids, pad_id=tok.pad_token_id,
                              eos_id=tok.eos_token_id, repeat=G)
    lengths = full["completion_mask"].sum(1)
    assert lengths.min() < lengths.max()  # rows stop at different lengths: right padding too
    mask = full["completion_mask"].bool()
    with torch.no_grad():
        forward = completion_logprobs(model, full, temperature=0.9,
                                      suppress_token_ids=vision_token_ids(processor))
    torch.testing.assert_close(forward[mask], ours.logprobs[mask],
                               atol=5e-6 if rows == 2 else 1e-5, rtol=0)


def test_implementations_agree(processor, warm_models):
    """The three implementations compute the same attention: the training forward's log-probs of
    one set of completions agree to fp32 rounding (so the emulated FA2 is attention, and a test
    passing under it is not passing on a different model)."""
    batch = _prompts(processor)
    tok = processor.tokenizer
    ours = _sample(warm_models["sdpa"], processor, batch, "static")
    full = append_completions(batch, ours.completion_ids, pad_id=tok.pad_token_id,
                              eos_id=tok.eos_token_id, repeat=G)
    mask = full["completion_mask"].bool()
    with torch.no_grad():
        scores = {impl: completion_logprobs(m, full, temperature=0.9,
                                            suppress_token_ids=vision_token_ids(processor))[mask]
                  for impl, m in warm_models.items()}
    for impl in ("eager", "flash_attention_2"):
        torch.testing.assert_close(scores[impl], scores["sdpa"], atol=1e-5, rtol=0)


def test_flash_fast_decode_is_the_forward_bit_for_bit(processor, warm_models, monkeypatch):
    """Under flash attention the static cache's direct decode-layer loop (2-D step masks) gives
    bitwise the samples and log-probs of the language model's own forward per step."""
    model = warm_models["flash_attention_2"]
    batch = _prompts(processor)
    assert generation._fast_decode_ok(model)
    fast = _sample(model, processor, batch, "static")
    monkeypatch.setattr(generation, "_fast_decode_ok", lambda m: False)
    forward = _sample(model, processor, batch, "static")
    assert torch.equal(fast.completion_ids, forward.completion_ids)
    assert torch.equal(fast.logprobs, forward.logprobs)


def test_written_masks_cover_only_written_slots():
    """Step t of a static cache sees the real prompt tokens and slots <= P + t, at length K."""
    full = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # [N=2, K=6], P=3
    masks = generation.written_masks(full, 3, 2)  # [2, 2, 6]
    assert masks.tolist() == [
        [[False, True, True, True, False, False], [True, True, True, True, False, False]],
        [[False, True, True, True, True, False], [True, True, True, True, True, False]],
    ]


# ---------------------------------------------------------------------------------------------
# auto, compiled decode
# ---------------------------------------------------------------------------------------------


def test_auto_resolves_only_to_covered_implementations():
    """Every input of the rule resolves to an implementation the tests above run; FA2 only with
    CUDA, transformers' FA2 available and half precision."""
    for dtype, cuda, fa2 in itertools.product(
            (torch.float32, torch.bfloat16, torch.float16), (False, True), (False, True)):
        got = resolve_attn_implementation("auto", dtype=dtype, cuda_available=cuda,
                                          flash_attn_2_available=fa2)
        assert got in IMPLEMENTATIONS
        assert (got == "flash_attention_2") == (cuda and fa2 and dtype != torch.float32)
    # with no overrides: this CPU machine has neither CUDA nor flash-attn
    if not torch.cuda.is_available():
        assert resolve_attn_implementation("auto", dtype=torch.bfloat16) == "sdpa"


def test_compile_key_tracks_what_changes_the_graph(tiny_dir, monkeypatch):
    """The compiled decode steps are keyed by function, attention implementation, rows, cache
    length, dtype and device (no compilation here: ``torch.compile`` wraps lazily), and the
    compiled cache length is rounded so that nearby prompt lengths share one graph."""
    model = load_model(tiny_dir, dtype="float32", attn_implementation="sdpa")
    key = generation.compile_key(True, model, 8, 128)
    assert key == generation.compile_key(True, model, 8, 128)
    others = [generation.compile_key(False, model, 8, 128), generation.compile_key(True, model, 4, 128),
              generation.compile_key(True, model, 8, 192)]
    model.to(torch.bfloat16)
    others.append(generation.compile_key(True, model, 8, 128))
    model.to(torch.float32)
    model.config._attn_implementation = "eager"  # the key reads the text config
    others.append(generation.compile_key(True, model, 8, 128))
    model.config._attn_implementation = "sdpa"
    assert len({key, *others}) == 1 + len(others)
    meta = torch.nn.Linear(2, 2, device="meta")
    monkeypatch.setattr(model, "parameters", lambda: iter(meta.parameters()))
    assert generation.compile_key(True, model, 8, 128) != key  # device

    monkeypatch.setattr(generation, "_COMPILED", {})
    step = generation._decode_fn(True, True, key)
    assert generation._decode_fn(True, True, key) is step
    assert generation._decode_fn(True, True, others[2]) is not step
    assert len(generation._COMPILED) == 2
    assert generation._decode_fn(False, True) is generation._decode_logits
    with pytest.raises(ValueError, match="compile_key"):
        generation._decode_fn(True, True)

    m = generation.COMPILE_CACHE_MULTIPLE
    assert generation.compiled_cache_len(70, 40, False) == 110
    assert generation.compiled_cache_len(70, 40, True) == generation.compiled_cache_len(77, 40, True)
    assert generation.compiled_cache_len(70, 40, True) % m == 0
    assert 110 <= generation.compiled_cache_len(70, 40, True) < 110 + m


def test_compiled_decode_cache_keeps_its_address(tiny_dir, monkeypatch):
    """Under compile_decode the repeated decode cache is written in place into the previous
    call's when the compile key is the same (CUDA graphs see one static address), with the
    values of this call's prefill; a new key starts a new cache and drops the old one."""
    model = load_model(tiny_dir, dtype="float32", attn_implementation="sdpa")
    text = model.config.get_text_config(decoder=True)
    heads, dim = text.num_key_value_heads, text.hidden_size // text.num_attention_heads
    b, g, k = 2, 3, 16
    monkeypatch.setattr(generation, "_DECODE_CACHE", {})

    def prefilled(p: int, seed: int):
        torch.manual_seed(seed)
        kv = generation._new_cache(model, "static", k)
        for layer in range(text.num_hidden_layers):
            kv.update(torch.randn(b, heads, p, dim), torch.randn(b, heads, p, dim), layer)
        return kv

    key = generation.compile_key(True, model, b * g, k)
    first = generation._decode_cache(prefilled(5, 0), g, key)
    address = first.layers[0].keys.data_ptr()
    source = prefilled(7, 1)
    expected = [(layer.keys.repeat_interleave(g, 0), layer.values.repeat_interleave(g, 0))
                for layer in source.layers]
    second = generation._decode_cache(source, g, key)
    assert second is first and second.layers[0].keys.data_ptr() == address
    for layer, (keys, values) in zip(second.layers, expected):
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
        assert int(layer.cumulative_length) == 7
    assert second.get_seq_length() == 7
    other = generation._decode_cache(prefilled(5, 2), g, generation.compile_key(True, model, b * g, 32))
    assert other is not first and list(generation._DECODE_CACHE) != [key]
