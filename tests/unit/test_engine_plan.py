"""The memory plan of ``medloc.engine_plan``, worked by hand, with its model-state terms held to
DeepSpeed's own estimators for the 3B, 7B and 32B shapes.

Bytes per parameter, bf16 (module docstring): weights 2 (all N), gradients 2 and optimizer side 16
(fp32 master 4 + Adam m, v 8 + fp32 gradient copy 4) per trainable parameter T; a reference of 2 N.
Stage 2 divides gradients and optimizer side by W, stage 3 also the weights and the reference;
under stage 3 generation gathers the full policy (2 N) on every GPU, and with parameter offload the
partitions are staged from CPU memory for it (+ 2 N / W). The update under stage 3 holds the
gathered layer and its gradient: 4 x the largest module's parameters (DeepSpeed's term).

Shapes: medloc.models.shapes (the released Qwen2.5-VL configs), counted from their sizes:
3B 3,754,622,976 (vision 668,684,288), 7B 8,292,166,656 (vision 676,550,144),
32B 33,452,718,336 (vision 688,841,984). Cards: 79.2 GiB (what torch reports for an 80 GB H100).
"""

from __future__ import annotations

import io
import re
from contextlib import redirect_stdout

import pytest
import torch

from medloc import engine_plan as ep
from medloc.engine_plan import (
    CANDIDATES,
    GIB,
    BytesPerParam,
    Workload,
    ZeroPlan,
    bytes_per_param,
    model_state_bytes,
)

BF16 = bytes_per_param("bf16")
H100 = int(79.2 * GIB)


@pytest.fixture(scope="module")
def shapes():
    return {name: ep.shape_from_table(name) for name in ("3b", "7b", "32b")}


def _paper(**changes) -> Workload:
    """The paper preset's GRPO workload (conf/preset/paper.yaml on conf/dataset/ham10000.yaml,
    the 7B model config): 1,003,520 pixels -> 1,280 image tokens, 128 text tokens (ASSUMED),
    256 new tokens, micro-batch 4, G = 8, 8 prompts per step, checkpointing on, a reference."""
    base = {"method": "grpo", "max_pixels": 1_003_520, "prompt_text_tokens": 128, "completion_tokens": 256,
                "micro_batch": 4, "num_generations": 8, "prompts_per_step": 8, "gradient_checkpointing": True,
                "freeze_vision": False, "attn_implementation": "auto", "with_reference": True}
    return Workload(**{**base, **changes})


def _evaluate(plan, shape, workload, world, *, device=H100, host=512 * GIB, reserve=6, ranks=None):
    return ep.evaluate(plan, shape=shape, workload=workload, precision="bf16", world_size=world,
                       ranks_per_node=world if ranks is None else ranks,
                       reserve_bytes=reserve * GIB, host_reserve_bytes=4 * GIB * world,
                       device_bytes=device, host_bytes=host)


def _auto(shape, workload, world, *, device=H100, host=512 * GIB):
    return ep.choose([_evaluate(p, shape, workload, world, device=device, host=host)
                      for p in CANDIDATES])


# ---------------------------------------------------------------------------------------------
# bytes per parameter, parameter counts
# ---------------------------------------------------------------------------------------------


def test_bytes_per_param_by_precision():
    assert BF16 == BytesPerParam(weights=2, grads=2, optimizer=16)  # 4 master + 8 moments + 4 cast
    assert bytes_per_param("fp32") == BytesPerParam(weights=4, grads=4, optimizer=8)  # moments only
    with pytest.raises(ValueError, match="precision"):
        bytes_per_param("fp16")


@pytest.mark.parametrize("name,total,vision,largest", [
    ("3b", 3_754_622_976, 668_684_288, 311_164_928),  # tied lm_head; embedding 151,936 x 2048
    ("7b", 8_292_166_656, 676_550_144, 544_997_376),  # embedding 152,064 x 3584
    ("32b", 33_452_718_336, 688_841_984, 778_567_680),  # embedding 152,064 x 5120
])
def test_parameter_counts_equal_the_model_transformers_builds(name, total, vision, largest):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from medloc.models import shapes

    s = ep.shape_from_table(name)
    assert (s.n_params, s.n_vision_params, s.largest_module_params) == (total, vision, largest)
    config = shapes.shape_config(shapes.SHAPES[ep.NAMED_SHAPES[name]], ep._NoSpecialTokens())
    with torch.device("meta"):  # sizes only, no memory
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == total
    assert sum(p.numel() for p in model.model.visual.parameters()) == vision
    # DeepSpeed's largest_layer_params: the most parameters a module holds itself.
    assert max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()) == largest


def test_unknown_model_name_says_what_is_expected():
    with pytest.raises(ValueError, match="3b"):
        ep.shape_from_table("13b")


# ---------------------------------------------------------------------------------------------
# model states and host terms by hand
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "plan,expected",
    [
        # N = 1000, T = 800, W = 4, largest module 100, bf16, with reference:
        # (weights, grads, optimizer, reference, generation gather, working with grad, without)
        (ZeroPlan(0), (2000, 1600, 12800, 2000, 0, 0, 0)),  # nothing partitioned
        (ZeroPlan(1), (2000, 1600, 3200, 2000, 0, 0, 0)),  # optimizer side / 4
        (ZeroPlan(2), (2000, 400, 3200, 2000, 0, 0, 0)),  # + gradients / 4
        (ZeroPlan(2, offload_optimizer=True), (2000, 0, 0, 2000, 0, 0, 0)),
        # + weights, reference / 4; the policy gathered for generation (2N); 4 x 100 and 2 x 100
        (ZeroPlan(3), (500, 400, 3200, 500, 2000, 400, 200)),
        (ZeroPlan(3, offload_optimizer=True), (500, 0, 0, 500, 2000, 400, 200)),
        # partitions in CPU memory; the gather stages them on the GPU too: 2000 + 500
        (ZeroPlan(3, offload_optimizer=True, offload_params=True), (0, 0, 0, 0, 2500, 400, 200)),
    ],
)
def test_what_each_stage_partitions(plan, expected):
    e = model_state_bytes(plan, n_params=1000, n_trainable=800, bpp=BF16, world_size=4,
                          with_reference=True, largest_module_params=100)
    assert (e.weights, e.grads, e.optimizer, e.reference, e.generation_gather,
            e.zero3_working_grad, e.zero3_working_nograd) == expected


@pytest.mark.parametrize(
    "plan,ranks,expected",
    [
        # N = 1000, T = 800, W = 4, largest 100, bf16, reference; R processes on this node.
        (ZeroPlan(0), 4, {"model load": 4 * 2000}),  # each process builds the whole model
        (ZeroPlan(2, offload_optimizer=True), 4,
         {"optimizer offload": 4 * 3200, "model load": 8000}),  # 16 x 800 / 4 per process
        # two nodes of 2: per node 2 x 3200 optimizer, 2 x 500 policy, 2 x 500 reference;
        # zero.Init: 2 x (100 x 2) at load
        (ZeroPlan(3, offload_optimizer=True, offload_params=True), 2,
         {"optimizer offload": 6400, "parameter offload (policy)": 1000,
          "parameter offload (reference)": 1000, "model load": 400}),
    ],
)
def test_host_terms(plan, ranks, expected):
    terms = ep.host_terms(plan, n_params=1000, n_trainable=800, largest_module_params=100, bpp=BF16,
                          world_size=4, ranks_per_node=ranks, with_reference=True)
    got = {name.split(" (fp32")[0].split(" (each")[0]: b for name, b in terms}
    assert got == expected


def test_invalid_arguments():
    with pytest.raises(ValueError, match="n_trainable"):
        model_state_bytes(ZeroPlan(0), n_params=10, n_trainable=11, bpp=BF16, world_size=1,
                          with_reference=False)
    with pytest.raises(ValueError, match="world_size"):
        model_state_bytes(ZeroPlan(0), n_params=10, n_trainable=10, bpp=BF16, world_size=0,
                          with_reference=False)
    with pytest.raises(ValueError, match="offload_params needs stage 3"):
        model_state_bytes(ZeroPlan(2, offload_params=True), n_params=10, n_trainable=10, bpp=BF16,
                          world_size=1, with_reference=False)
    with pytest.raises(ValueError, match="ranks_per_node"):
        ep.host_terms(ZeroPlan(0), n_params=10, n_trainable=10, largest_module_params=1, bpp=BF16,
                      world_size=2, ranks_per_node=3, with_reference=False)


# ---------------------------------------------------------------------------------------------
# the model-state terms against DeepSpeed's own estimators
# ---------------------------------------------------------------------------------------------


def _ours(plan, shape, gpus):
    """Model states per GPU and host terms per node (one node of ``gpus``), all parameters
    trained, no reference: what DeepSpeed's estimators describe."""
    n, largest = shape.n_params, shape.largest_module_params
    states = model_state_bytes(plan, n_params=n, n_trainable=n, bpp=BF16, world_size=gpus,
                               with_reference=False, largest_module_params=largest)
    host = dict(ep.host_terms(plan, n_params=n, n_trainable=n, largest_module_params=largest,
                              bpp=BF16, world_size=gpus, ranks_per_node=gpus,
                              with_reference=False))
    host = {k.split(" (")[0]: v for k, v in host.items()}
    return states, host


@pytest.mark.parametrize("gpus", [1, 4, 8])
@pytest.mark.parametrize("name", ["3b", "7b", "32b"])
def test_zero2_terms_equal_deepspeeds_estimator(shapes, name, gpus):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    s, n = shapes[name], shapes[name].n_params
    buffer = 1.5  # the estimator's additional_buffer_factor, on its CPU figures only
    # No offload: GPU 2 N + 18 N / W (bf16 weights; bf16 gradients, fp32 gradients, master,
    # moments partitioned). Ours: the same terms, each rounded up on its own (<= 2 bytes apart).
    cpu, gpu = estimate_zero2_model_states_mem_needs(n, gpus, 1, cpu_offload=False)
    states, host = _ours(ZeroPlan(2), s, gpus)
    assert abs((states.weights + states.grads + states.optimizer) - gpu) <= 2
    # Its CPU figure is each process holding the model in fp32 while loading (4 N per GPU); ours
    # loads in the run's precision, bf16: exactly half of it.
    assert host["model load"] == 2 * n * gpus and abs(cpu - buffer * 2 * host["model load"]) <= 1
    # Optimizer offload: GPU 2 N. CPU max(4 W, 16) N: the offloaded 16 N, or the fp32 load of W
    # processes when that is larger (W = 8); our load is bf16, i.e. 2 W N.
    cpu, gpu = estimate_zero2_model_states_mem_needs(n, gpus, 1, cpu_offload=True)
    states, host = _ours(ZeroPlan(2, offload_optimizer=True), s, gpus)
    assert states.weights + states.grads + states.optimizer == gpu == 2 * n
    assert host["optimizer offload"] == 16 * n
    assert abs(cpu - buffer * max(host["optimizer offload"], 2 * host["model load"])) <= 1


@pytest.mark.parametrize("gpus", [1, 4, 8])
@pytest.mark.parametrize("name", ["3b", "7b", "32b"])
def test_zero3_terms_equal_deepspeeds_estimator(shapes, name, gpus):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    s = shapes[name]
    n, largest = s.n_params, s.largest_module_params
    buffer = 1.5

    def estimate(offload, offload_params):  # zero_init: transformers loads under zero.Init here
        return estimate_zero3_model_states_mem_needs(
            n, largest, gpus, 1, cpu_offload=offload, cpu_offload_params=offload_params,
            zero_init=True)

    # No offload: GPU 4 x largest + 18 N / W. Ours is 2 N / W more: the estimator's no-offload
    # row counts the bf16 gradients and the optimizer side (2 + 16) but not the bf16 weight
    # partition, which its offload row does count (2 N / W, below). Intentional: it is there.
    cpu, gpu, largest_memory = estimate(False, False)
    states, host = _ours(ZeroPlan(3), s, gpus)
    assert largest_memory == states.zero3_working_grad == 4 * largest
    assert abs(states.update - (gpu + states.weights)) <= 3
    assert states.weights == -(-2 * n // gpus)
    # CPU: one module in fp32 per process while zero.Init partitions it; ours bf16, half of it.
    assert abs(cpu - buffer * 2 * host["model load"]) <= 1
    # Optimizer offload: GPU 4 x largest + 2 N / W; CPU 16 N per node.
    cpu, gpu, _ = estimate(True, False)
    states, host = _ours(ZeroPlan(3, offload_optimizer=True), s, gpus)
    assert abs(states.update - gpu) <= 1
    assert abs(cpu - buffer * host["optimizer offload"]) <= 1 and host["optimizer offload"] == 16 * n
    # Both offloads: GPU 4 x largest; CPU 18 N (16 N optimizer side + 2 N bf16 weights).
    cpu, gpu, _ = estimate(True, True)
    states, host = _ours(ZeroPlan(3, offload_optimizer=True, offload_params=True), s, gpus)
    assert states.update == gpu == 4 * largest
    assert abs(cpu - buffer * (host["optimizer offload"] + host["parameter offload"])) <= 1
    # What the estimators leave out and the plan counts: the generation gather, 2 N + 2 N / W.
    assert states.generation_gather == 2 * n + -(-2 * n // gpus)


def test_the_printed_estimates_agree_for_7b_on_4_gpus(shapes):
    """The ``*_all_cold`` functions print the figures tested above (GiB to 2 decimals)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    s = shapes["7b"]
    out = io.StringIO()
    with redirect_stdout(out):
        estimate_zero2_model_states_mem_needs_all_cold(s.n_params, num_gpus_per_node=4)
        estimate_zero3_model_states_mem_needs_all_cold(s.n_params, s.largest_module_params,
                                                       num_gpus_per_node=4)
    rows = {re.sub(r"\s+|OffloadDeviceEnum\.", "", opts): (float(c), float(g)) for c, g, opts in
            re.findall(r"^\s*([\d.]+)GB \|\s*([\d.]+)GB \| (.*)$", out.getvalue(), re.MULTILINE)}
    z2, _ = _ours(ZeroPlan(2), s, 4)
    assert rows["offload_optimizer=none"][1] == round((z2.weights + z2.grads + z2.optimizer) / GIB, 2)
    z3, host = _ours(ZeroPlan(3, offload_optimizer=True, offload_params=True), s, 4)
    cpu, gpu = rows["offload_param=cpu,offload_optimizer=cpu,zero_init=1"]
    assert gpu == round(z3.update / GIB, 2)
    assert cpu == round(1.5 * (host["optimizer offload"] + host["parameter offload"]) / GIB, 2)


# ---------------------------------------------------------------------------------------------
# activations, KV cache, logits by hand
# ---------------------------------------------------------------------------------------------


def test_image_tokens_from_the_pixel_budget():
    assert ep.image_tokens(1_003_520, patch_size=14, merge_size=2) == 1280  # 1,003,520 / 784
    assert ep.image_tokens(1_003_519, patch_size=14, merge_size=2) == 1279
    assert ep.image_tokens(12_544, patch_size=14, merge_size=2) == 16  # 112 x 112: the tiny model


def test_layer_bytes_by_hand(shapes):
    # h = 10, f = 30, kv_dim = 4, bf16: norms 2 (4 + 4) 10 = 160; q 20; k, v 16; output 40;
    # MLP 4 x 2 x 30 = 240 -> 476 bytes per token.
    assert ep.layer_bytes_per_token(hidden=10, intermediate=30, kv_dim=4, act_bytes=2) == 476
    # 7B (h 3584, f 18944; 28 heads of 128, 4 key/value heads), bf16: norms 57,344; q 7,168;
    # output 14,336; MLP 151,552; keys and values repeated to 28 heads under sdpa (2 x 2 x 3584 =
    # 14,336), grouped under flash-attention (2 x 2 x 512 = 2,048).
    s = shapes["7b"]
    assert ep.llm_layer_per_token(s, 2, "sdpa") == 244_736
    assert ep.llm_layer_per_token(s, 2, "auto") == 244_736
    assert ep.llm_layer_per_token(s, 2, "flash_attention_2") == 232_448
    with pytest.raises(ValueError, match="attn_implementation"):
        ep.llm_layer_per_token(s, 2, "flex")


def test_micro_batch_prompts_by_hand():
    # 16 rows of 2 prompts (G = 8): micro-batches of 4 hold one prompt, of 6 split a group
    # ([0, 6) one, [6, 12) two, [12, 16) one), all 16 rows two; SFT (G = 1): one per row.
    assert ep.micro_batch_prompts(rows=16, micro_batch=4, group=8) == 1
    assert ep.micro_batch_prompts(rows=16, micro_batch=6, group=8) == 2
    assert ep.micro_batch_prompts(rows=16, micro_batch=16, group=8) == 2
    assert ep.micro_batch_prompts(rows=8, micro_batch=8, group=1) == 8
    with pytest.raises(ValueError, match="micro_batch=0"):
        ep.micro_batch_prompts(rows=8, micro_batch=0, group=8)


def test_stacks_by_hand():
    kw = {"tokens": 10, "hidden": 4, "layer_per_token": 100, "act_bytes": 2}
    # checkpointing: 3 layers x 2 x 4 x 10 inputs = 240, + 2 x one layer (1000) + hidden-state
    # gradients 2 x 2 x 4 x 10 = 160 -> 2400; without: (3 + 1) x 1000 + 160 = 4160.
    assert ep.stack_training_bytes(layers=3, layer_scores=0, checkpointing=True, **kw) == 2400
    assert ep.stack_training_bytes(layers=3, layer_scores=0, checkpointing=False, **kw) == 4160
    # eager: each layer's probabilities (50) add to one layer: 2 x 1050 / 4 x 1050.
    assert ep.stack_training_bytes(layers=3, layer_scores=50, checkpointing=True, **kw) == 2500
    assert ep.stack_training_bytes(layers=3, layer_scores=50, checkpointing=False, **kw) == 4360
    # no grad: hidden states in and out 160 + one layer 1000.
    assert ep.stack_inference_bytes(layer_scores=0, **kw) == 1160
    # [2 rows, 3 heads, 5, 5] probabilities: float32 softmax + bf16 copy = 2 x 3 x 25 x 6.
    assert ep.eager_scores_bytes(rows=2, heads=3, queries=5, keys=5, act_bytes=2) == 900


def test_kv_cache_logits_and_sampling_by_hand():
    # 7B decode at the paper preset: 16 rows x 1,664 slots x 28 layers x 2 x 4 heads x 128 x 2 B.
    assert ep.kv_cache_bytes(rows=16, slots=1664, layers=28, kv_heads=4, head_dim=128,
                             act_bytes=2) == 1_526_726_656  # 1.42 GiB
    v, pos = 152_064, 257
    # with grad: bf16 logits + float32 copies kept for logsumexp: 6 bytes per logit.
    assert ep.grpo_logits_bytes(rows=4, positions=pos, vocab=v, act_bytes=2, grad=True) \
        == 4 * pos * v * 6
    # without: bf16 logits + 3 float32 chunks of one row (257 x 152,064 = 39M < 64 Mi elements).
    assert ep.logprob_chunk_rows(pos, v) == 1
    assert ep.grpo_logits_bytes(rows=4, positions=pos, vocab=v, act_bytes=2, grad=False) \
        == 4 * pos * v * 2 + 3 * 4 * pos * v
    # shared prefix: the completion pass's [4, 255, V] bf16 beside the [4, 256, V] it joins.
    assert ep.shared_prefix_logits_bytes(rows=4, completion=256, vocab=v, act_bytes=2, grad=True) \
        == 4 * 255 * v * 2 + 4 * 256 * v * 6
    # SFT at M = 2,048 supervised positions: bf16 logits + every chunk's float32 log-softmax + the
    # bf16 gradient (8 B per logit), and one float32 chunk of 441 positions (64 Mi // 152,064)
    # with its gradient (8 B per element).
    assert ep.sft_logits_bytes(positions=2048, vocab=v, act_bytes=2) \
        == 2048 * v * 8 + 8 * 441 * v
    assert ep.sft_logits_bytes(positions=3, vocab=v, act_bytes=2) == 3 * v * 8 + 8 * 3 * v
    assert ep.sampling_bytes(rows=16, vocab=v) == 16 * v * 4 * 8


# ---------------------------------------------------------------------------------------------
# the phases and the review's findings
# ---------------------------------------------------------------------------------------------


def test_phases_peak_and_need(shapes):
    c = _evaluate(ZeroPlan(2), shapes["7b"], _paper(), 4)
    assert [ph.name for ph in c.phases] == ["generate: vision tower", "generate: prefill",
                                            "generate: decode", "reference forward", "update"]
    for ph in c.phases:
        assert ph.total == sum(b for _, b in ph.terms)
    assert c.peak_phase.total == max(ph.total for ph in c.phases)
    assert c.gpu_need == c.peak_phase.total + 6 * GIB
    decode = dict(c.phases[2].terms)
    assert decode["KV cache: 16 rows x 1664 slots"] == 1_526_726_656  # 2 prompts x G = 8 rows
    # No gradients outside the update; the update has no KV cache.
    assert all(not name.startswith("grads") for ph in c.phases[:-1] for name, _ in ph.terms)
    assert not any(name.startswith("KV") for name, _ in c.phases[-1].terms)


def test_zero3_with_parameter_offload_gathers_everything_for_generation(shapes):
    """Review finding: 32B on 4 x 80 GB under ZeRO-3 + both offloads peaks at 2 N + 2 N / W in
    generation (plus KV cache and reserve): it does not fit, though the model states alone
    (4 x the largest layer per GPU) would."""
    s = shapes["32b"]
    c = _evaluate(ZeroPlan(3, offload_optimizer=True, offload_params=True), s, _paper(
        micro_batch=1), 4)
    gather = dict(c.phases[0].terms)["generation gather"]
    assert gather == 2 * s.n_params + 2 * s.n_params // 4  # 66.9e9 + 16.7e9 B = 77.9 GiB
    assert round(gather / GIB, 1) == 77.9
    assert c.peak_phase.name.startswith("generate") and not c.gpu_fits
    # Without parameter offload the gather is the full policy beside the partition: 2 N.
    c3 = _evaluate(ZeroPlan(3, offload_optimizer=True), s, _paper(micro_batch=1), 4)
    assert dict(c3.phases[0].terms)["generation gather"] == 2 * s.n_params


def test_7b_at_zero2_on_four_80gb_gpus_fits_with_the_tower_once_per_image(shapes):
    """Model states 2N + 18N/4 + 2N (reference) = 65.6 GiB leave ~13.6 GiB of a 79.2 GiB card.
    The trainable tower runs once per image of a micro-batch (4 rows of one prompt: 1 image, 1.1
    GiB; once per row it was 4 images, 4.3 GiB) and the shared-prefix update runs 1 x 1,408 + 4 x
    255 tokens: the update needs 69.4 GiB + 6 GiB reserve and ZeRO-2 fits, so the rule takes it
    on a 512 GiB host and on a 128 GiB one (where the optimizer offload would not fit)."""
    s = shapes["7b"]
    c = _evaluate(ZeroPlan(2), s, _paper(), 4)
    update = dict(c.phases[-1].terms)
    states = sum(update[k] for k in ("weights", "grads", "optimizer", "reference"))
    assert states == 2 * s.n_params + 18 * s.n_params // 4 + 2 * s.n_params  # 65.64 GiB
    assert round(states / GIB, 2) == 65.64
    tower = update["vision tower with grad: 1 image(s), once per image per micro-batch"]
    assert tower == ep.vision_tower_bytes(s, images=1, patches=5120, attn="auto", act_bytes=2,
                                          grad=True, checkpointing=True)
    assert c.peak_phase.name == "update" and c.gpu_fits
    assert round(c.gpu_need / GIB, 1) == 75.4
    assert _auto(s, _paper(), 4).plan == ZeroPlan(2)
    assert _auto(s, _paper(), 4, host=128 * GIB).plan == ZeroPlan(2)
    # The per-row forward (grpo.shared_prefix_update=false): 4 x 1,664 tokens, 2.6 GiB more.
    per_row = _evaluate(ZeroPlan(2), s, _paper(shared_prefix_update=False), 4)
    assert round(per_row.gpu_need / GIB, 1) == 78.0 and per_row.gpu_fits


def test_shared_prefix_update_terms_by_hand(shapes):
    """7B, paper preset, ZeRO-2 on 4 GPUs: 2 prompts x G = 8 rows per process, micro-batch 4
    (one prompt), P = 1,408, L = 256. The prefix pass runs 1 x 1,408 tokens, the completion pass
    4 x 255, over the prompt's keys/values (28 layers x 4 kv heads x 128) repeated per row."""
    s = shapes["7b"]
    update = dict(_evaluate(ZeroPlan(2), s, _paper(), 4).phases[-1].terms)
    kv_prefix = 28 * 1 * 1408 * 2 * 4 * 128 * 2  # 80,740,352 B
    assert update["prefix keys/values: 1 x 1408, every layer, with grad"] == kv_prefix
    assert update["prefix keys/values repeated per row: 4 x 1408, every layer"] == 4 * kv_prefix
    # activations: each pass keeps every layer's input (checkpointing), the larger backward
    # recomputes one layer twice over: the completion pass's layer also sees the prompt's keys
    # and values (4 rows x 1,408 x 2 x 3,584, repeated to all heads under sdpa).
    per_token = ep.llm_layer_per_token(s, 2, "auto")
    h = 3584
    one_prefix = 1408 * per_token
    one_completion = 1020 * per_token + 4 * 1408 * 2 * h * 2
    backward = max(2 * one_prefix + 2 * 2 * h * 1408, 2 * one_completion + 2 * 2 * h * 1020)
    assert update["activations: prefix 1 x 1408 + completions 4 x 255 tokens, checkpointing on"] \
        == 28 * 2 * h * 1408 + 28 * 2 * h * 1020 + backward
    assert update["logits: 4 x 256 x 152064 (+ the completion pass's 255)"] \
        == 4 * 255 * 152064 * 2 + 4 * 256 * 152064 * 6
    # no term of the per-row forward
    assert not any(k.startswith("activations: 4 x 1664") for k in update)
    # the reference forward takes the same two passes without grad
    ref = dict(_evaluate(ZeroPlan(2), s, _paper(), 4).phases[3].terms)
    assert ref["prefix keys/values: 1 x 1408, every layer, no grad"] == kv_prefix
    assert ref["logits: 4 x 256 x 152064 (+ the completion pass's 255)"] == \
        4 * 255 * 152064 * 2 + 4 * 256 * 152064 * 2 + 3 * 4 * 256 * 152064
    assert ref["activations: prefix 1 x 1408 + completions 4 x 255 tokens, no grad"] == max(
        2 * 2 * h * 1408 + one_prefix, 2 * 2 * h * 1020 + one_completion)


def test_compile_decode_keeps_one_cache_between_rollouts(shapes):
    """grpo.compile_decode: the N x K static cache (K = 1,408 + 200 = 1,608 rounded up to 1,664, a
    multiple of 64) stays allocated after the rollout: every phase but decode holds it too."""
    s = shapes["7b"]
    cache = ep.kv_cache_bytes(rows=16, slots=1664, layers=28, kv_heads=4, head_dim=128, act_bytes=2)
    on = _evaluate(ZeroPlan(2), s, _paper(completion_tokens=200, compile_decode=True), 4)
    key = "compiled decode's KV cache, kept: 16 rows x 1664 slots"
    for ph in on.phases:
        terms = dict(ph.terms)
        if ph.name == "generate: decode":
            assert key not in terms and terms["KV cache: 16 rows x 1664 slots"] == cache
        else:
            assert terms[key] == cache, ph.name
    off = _evaluate(ZeroPlan(2), s, _paper(completion_tokens=200), 4)
    assert not any(k.startswith("compiled") for ph in off.phases for k, _ in ph.terms)
    assert "KV cache: 16 rows x 1608 slots" in dict(off.phases[2].terms)
    assert on.phases[-1].total - off.phases[-1].total == cache


def test_offload_checks_the_host_ram(shapes):
    """Review finding: 7B optimizer offload pins 16 N = 123.6 GiB on the host. On one GPU with
    128 GiB that cannot fit (nor can any other candidate); with 512 GiB it does."""
    s = shapes["7b"]
    plan = ZeroPlan(2, offload_optimizer=True)
    c = _evaluate(plan, s, _paper(), 1, host=128 * GIB)
    host = dict(c.host)
    assert host["optimizer offload (fp32 master, moments, gradients; pinned)"] == 16 * s.n_params
    assert round(16 * s.n_params / GIB, 1) == 123.6
    assert c.gpu_fits and not c.host_fits and not c.fits
    chosen = _auto(s, _paper(), 1, host=128 * GIB)
    assert not chosen.fits and chosen.plan == CANDIDATES[-1]  # nothing fits; said so
    assert _auto(s, _paper(), 1, host=512 * GIB).plan == plan
    assert _evaluate(plan, s, _paper(), 1, host=None).host_fits  # unknown RAM: not compared


def test_what_the_config_changes(shapes):
    s = shapes["3b"]

    def update(**changes):
        return dict(_evaluate(ZeroPlan(0), s, _paper(**{"micro_batch": 8, **changes}),
                              1).phases[-1].terms)

    # the per-row forward (grpo.shared_prefix_update=false): 8 rows x (P + L) tokens
    on = update(shared_prefix_update=False)
    off = update(shared_prefix_update=False, gradient_checkpointing=False)
    key_on = "activations: 8 x 1664 tokens, checkpointing on"
    assert off["activations: 8 x 1664 tokens, checkpointing off"] > 5 * on[key_on]
    # eager attention keeps [8, 16, 1664, 1664] probabilities per layer: 8 x 16 x 1664^2 x 6 B
    eager = update(shared_prefix_update=False, attn_implementation="eager")
    assert eager[key_on] - on[key_on] == 2 * 8 * 16 * 1664 ** 2 * 6
    # the shared prefix: 1 x 1,408 + 8 x 255 tokens instead of 8 x 1,664, a third of the bytes
    shared = update()
    key_shared = "activations: prefix 1 x 1408 + completions 8 x 255 tokens, checkpointing on"
    assert 2 * shared[key_shared] < on[key_on]
    # the tower once per image of a micro-batch: 8 rows of one prompt, 1 image, shared or not
    tower = "vision tower with grad: 1 image(s), once per image per micro-batch"
    assert on[tower] == shared[tower] == ep.vision_tower_bytes(
        s, images=1, patches=5120, attn="auto", act_bytes=2, grad=True, checkpointing=True)
    assert update(micro_batch=16)["vision tower with grad: 2 image(s), once per image per "
                                  "micro-batch"] > 1.9 * on[tower]
    # a frozen tower: no tower in the update, fewer trainable parameters
    frozen = update(freeze_vision=True)
    assert not any(k.startswith("vision tower") for k in frozen)
    assert on["optimizer"] - frozen["optimizer"] == 16 * s.n_vision_params
    # twice the pixels: about twice the activations
    assert update(max_pixels=2 * 1_003_520, shared_prefix_update=False)[
        "activations: 8 x 2944 tokens, checkpointing on"] > 1.7 * on[key_on]


def test_sft_has_the_update_only_with_logits_at_supervised_positions(shapes):
    """SFT: one forward of 8 rows x (P + L) (no shared prefix), logits at M = 8 x 256 supervised
    positions at most (medloc.sft: [M, V]), the tower on each row's own image."""
    c = _evaluate(ZeroPlan(0), shapes["3b"], _paper(method="sft", num_generations=1,
                                                    with_reference=False, micro_batch=8), 1)
    assert [ph.name for ph in c.phases] == ["update"]
    terms = dict(c.phases[0].terms)
    assert terms["logits: 2048 supervised positions x 151936"] \
        == 2048 * 151936 * 8 + 8 * 441 * 151936  # 64 Mi // 151,936 = 441 positions per chunk
    assert "activations: 8 x 1664 tokens, checkpointing on" in terms
    assert "vision tower with grad: 8 image(s), once per image per micro-batch" in terms
    assert terms["reference"] == 0


def test_workload_is_checked():
    with pytest.raises(ValueError, match="method"):
        _paper(method="dpo")
    with pytest.raises(ValueError, match="attn_implementation"):
        _paper(attn_implementation="flex")
    with pytest.raises(ValueError, match="micro_batch"):
        _paper(micro_batch=0)


def test_choose_takes_the_first_that_fits_else_the_most_frugal(shapes):
    s = shapes["3b"]
    evaluated = [_evaluate(p, s, _paper(micro_batch=8), 1) for p in CANDIDATES]
    chosen = ep.choose(evaluated)
    assert chosen.plan == ZeroPlan(2, offload_optimizer=True)  # ZeRO-0/2: 22 N = 77 GiB alone
    assert all(not c.fits for c in evaluated[:2])
    tiny_gpu = [_evaluate(p, s, _paper(), 1, device=GIB) for p in CANDIDATES]
    assert ep.choose(tiny_gpu).plan == CANDIDATES[-1] and not ep.choose(tiny_gpu).fits
    with pytest.raises(ValueError):
        ep.choose([])


def test_a_model_that_fits_never_gets_partitioned_on_one_gpu(shapes):
    # On one GPU ZeRO-2/3 without offload save nothing: what fits is ZeRO-0, else an offload.
    for s in shapes.values():
        for gib in (24, 40, 80, 140):
            plan = _auto(s, _paper(), 1, device=gib * GIB).plan
            assert plan == ZeroPlan(0) or plan.offload_optimizer, (s.n_params, gib, plan)


# ---------------------------------------------------------------------------------------------
# what is read at start
# ---------------------------------------------------------------------------------------------


def test_host_memory_from_meminfo_and_the_cgroup_limit(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       1048576 kB\nMemFree:  1 kB\n")
    limit, unlimited = tmp_path / "memory.max", tmp_path / "limit_in_bytes"
    limit.write_text("536870912\n")
    unlimited.write_text("max\n")
    assert ep.host_memory_bytes(meminfo, []) == GIB
    assert ep.host_memory_bytes(meminfo, [unlimited]) == GIB  # "max": no limit
    assert ep.host_memory_bytes(meminfo, [unlimited, limit]) == GIB // 2  # the job's limit
    assert ep.host_memory_bytes(tmp_path / "missing", [limit]) == GIB // 2
    assert ep.host_memory_bytes(tmp_path / "missing", []) is None


def test_ranks_per_node_from_the_launcher(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    assert ep.ranks_per_node(8) == 8  # one node
    monkeypatch.setenv("LOCAL_SIZE", "4")  # the DeepSpeed launcher
    assert ep.ranks_per_node(8) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun
    assert ep.ranks_per_node(8) == 2
