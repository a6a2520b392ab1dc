"""LoRA through peft (``peft=lora``; medloc/models/lora.py, medloc/engine.py), tiny Qwen2.5-VL, CPU.

- Targets: the language model's attention and MLP projections get adapters, the vision tower,
  its merger and the output head do not (``peft.include_vision=true`` adds every linear layer of
  the tower and merger); a target that matches nothing, a dropout under GRPO and an adapted tower
  that ``model.freeze_vision`` freezes fail at start with the field named.
- A GRPO step and an SFT step with ``peft=lora`` change only adapter parameters: every base
  parameter stays bitwise what it was, on ZeRO-0, ZeRO-2 and ZeRO-3 (one process). Two updates:
  the first moves only B (B starts at 0, so A's gradient B^T dL/dy is 0), the second moves A too.
- The reference is the policy with its adapters disabled (no second model is loaded): after the
  updates its log-probs and vision features equal a freshly loaded base model's bit for bit.
- B starts at zero, so the first rollout of a ``peft=lora`` run equals the full model's for the
  same seed (samples and their log-probs, bitwise).
- The merged folder (final/) loads with ``from_pretrained`` and its forward equals the adapter
  model's within 1e-5; the adapter folder (final/adapter) loads with our loader and with
  ``peft.PeftModel.from_pretrained`` (same logits), and ``evaluate_checkpoint`` gives the same
  predictions from both folders. Our merge equals peft's own ``merge_and_unload``.
- Exact resume (ZeRO-0): a run cut after its step-2 checkpoint (the checkpoint holds the adapter
  and its optimizer state only, not the frozen base) and resumed by a new trainer reproduces the
  straight run's step-2 row, IoUs, samples and final adapter bitwise.
The 2-process ZeRO-3 versions: tests/distributed/test_lora_zero3.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medloc import runtime
from medloc.data.collate import model_inputs
from medloc.evaluation import evaluate_checkpoint
from medloc.generation import image_features
from medloc.grpo.trainer import GRPOTrainer
from medloc.models.loading import load_model
from medloc.models.logprobs import completion_logprobs
from medloc.models.lora import (
    LANGUAGE_PROJECTIONS,
    AdaptersOff,
    is_adapter_key,
    load_adapter_model,
    lora_target_names,
)
from medloc.sft import SFTTrainer

torch.set_num_threads(1)

LORA = ["peft=lora", "peft.r=4", "peft.alpha=8"]
# Adam's first step moves each element by ~lr * sign(grad): 1e-2 is far above float noise.
UPDATE = ["optim.lr=1e-2", "model.micro_batch_size=4"]
ADV = torch.tensor([1.5, -0.5, 0.5, -1.5, -1.0, 1.0, 0.25, -0.25])  # [N] two zero-mean groups


def _rollout(trainer: GRPOTrainer, step: int = 0):
    runtime.seed_step(trainer.cfg.seed, step, trainer.rank)  # as fit() does
    records, images, problems = trainer.load_step_samples(step)
    assert problems == []
    return trainer.sample(records, images)


def _snapshot(trainer) -> dict[str, torch.Tensor]:
    """Every parameter of the policy, whole (ZeRO-3: gathered by generation_context)."""
    with trainer.engine.generation_context() as module:
        return {n: p.detach().clone() for n, p in module.named_parameters()}


def _moved(before: dict, after: dict) -> tuple[set[str], set[str]]:
    """(adapter tensors that moved, base tensors that moved)."""
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    return {n for n in moved if is_adapter_key(n)}, {n for n in moved if not is_adapter_key(n)}


# -- targets and config --------------------------------------------------------------------------


def test_targets_are_the_language_projections(model):
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    chosen = lora_target_names(linear, target_modules=LANGUAGE_PROJECTIONS, include_vision=False,
                               vision_prefix="model.visual")
    layers = model.config.get_text_config().num_hidden_layers
    assert len(chosen) == 7 * layers  # q k v o gate up down in every decoder layer
    assert all(n.startswith("model.language_model.layers.") for n in chosen)
    # The vision MLP has gate/up/down_proj too: they are not taken, nor lm_head.
    assert any(n.startswith("model.visual.") and n.endswith("gate_proj") for n in linear)
    with_vision = lora_target_names(linear, target_modules=LANGUAGE_PROJECTIONS,
                                    include_vision=True, vision_prefix="model.visual")
    vision = [n for n in linear if n.startswith("model.visual.")]
    assert set(with_vision) == set(chosen) | set(vision) and "lm_head" not in with_vision
    assert "model.visual.merger.mlp.0" in with_vision
    with pytest.raises(ValueError, match=r"\['qkv_proj'\] match no linear layer"):
        lora_target_names(linear, target_modules=["q_proj", "qkv_proj"], include_vision=False,
                          vision_prefix="model.visual")


def test_config_checks(compose_cfg):
    cfg = compose_cfg(["peft=lora"])
    assert (cfg.peft.kind, cfg.peft.r, cfg.peft.alpha, cfg.peft.dropout) == ("lora", 64, 128.0, 0.0)
    assert compose_cfg().peft.kind == "none"  # the default: full fine-tuning
    paper = compose_cfg(["preset=paper", "peft=lora"]).peft
    assert (paper.r, paper.alpha, paper.lr) == (64, 128.0, 1e-5)
    with pytest.raises(Exception, match=r"peft.dropout=0.1 with method=grpo"):
        compose_cfg(["peft=lora", "peft.dropout=0.1"])
    assert compose_cfg(["peft=lora", "peft.dropout=0.1", "method=sft"]).peft.dropout == 0.1
    with pytest.raises(Exception, match=r"model.freeze_vision=true freezes it"):
        compose_cfg(["peft=lora", "peft.include_vision=true", "model.freeze_vision=true"])
    with pytest.raises(Exception, match=r"peft.kind='qlora' is not allowed"):
        compose_cfg(["peft.kind=qlora"])


# -- GRPO and SFT steps --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_grpo(compose_cfg, tiny_model_dir, phantom_dataset, tmp_path_factory):
    """A ZeRO-0 peft=lora GRPO trainer (beta > 0), its first rollout, and the policy before and
    after each of two updates with hand-set advantages."""
    cfg = compose_cfg(["engine=zero0", *LORA, *UPDATE])
    assert cfg.grpo.beta > 0
    trainer = GRPOTrainer(cfg, tmp_path_factory.mktemp("lora_grpo"), str(tiny_model_dir))
    ro = _rollout(trainer)
    states = [_snapshot(trainer)]
    for _ in range(2):
        trainer.update(ro.batch, ADV, dead=0.0)
        states.append(_snapshot(trainer))
    return trainer, ro, states


def test_grpo_updates_move_only_the_adapters(lora_grpo):
    trainer, _, (s0, s1, s2) = lora_grpo
    adapters = {n for n in s0 if is_adapter_key(n)}
    assert adapters and {n for n, _ in trainer.engine.trainable_named_parameters()} == adapters
    assert all(not s0[n].any() for n in adapters if "lora_B" in n)  # B starts at zero
    moved, base_moved = _moved(s0, s1)
    assert base_moved == set()
    assert moved == {n for n in adapters if "lora_B" in n}  # step 1: only B (A's gradient is 0)
    moved, base_moved = _moved(s1, s2)
    assert base_moved == set() and moved == adapters  # step 2: every adapter tensor


def test_reference_is_the_base_model_with_adapters_off(lora_grpo, tiny_model_dir):
    trainer, ro, states = lora_grpo
    reference = trainer.engine.reference
    assert isinstance(reference, AdaptersOff)  # the policy itself: no second model was loaded
    assert {id(p) for p in reference.parameters()} == {id(p) for p in trainer.engine.module.parameters()}
    base = load_model(tiny_model_dir, attn_implementation=trainer.cfg.model.attn_implementation)
    gc = trainer.cfg.grpo
    kw = {"temperature": gc.temperature, "suppress_token_ids": trainer.suppress}
    with torch.no_grad():
        ref = completion_logprobs(reference, ro.batch, **kw)  # [N, L]
        want = completion_logprobs(base, ro.batch, **kw)
        policy = completion_logprobs(trainer.engine.module, ro.batch, **kw)
        feats = image_features(reference.module, ro.batch)
        want_feats = image_features(base, ro.batch)
    assert torch.equal(ref, want)
    assert all(torch.equal(a, b) for a, b in zip(feats, want_feats))
    assert not torch.equal(policy, want)  # the adapters are on again, and they moved
    assert {n for n, _ in trainer.engine.trainable_named_parameters()} == \
        {n for n in states[0] if is_adapter_key(n)}  # switching them off and on kept the set


def test_first_rollout_equals_the_full_models(lora_grpo, compose_cfg, tiny_model_dir, tmp_path):
    _, ro, _ = lora_grpo
    full = GRPOTrainer(compose_cfg(["engine=zero0", *UPDATE]), tmp_path, str(tiny_model_dir))
    assert full.engine.lora is None and full.engine.reference is not None
    ro_full = _rollout(full)
    assert torch.equal(ro.completion_ids, ro_full.completion_ids)
    assert torch.equal(ro.logprobs, ro_full.logprobs)
    assert ro.texts == ro_full.texts


@pytest.mark.parametrize("engine", ["zero2", "zero3"])
def test_grpo_update_moves_only_the_adapters_on_zero2_and_zero3(engine, compose_cfg, tiny_model_dir,
                                                                 phantom_dataset, tmp_path):
    trainer = GRPOTrainer(compose_cfg([f"engine={engine}", *LORA, *UPDATE]), tmp_path,
                          str(tiny_model_dir))
    ro = _rollout(trainer)
    before = _snapshot(trainer)
    trainer.update(ro.batch, ADV, dead=0.0)
    moved, base_moved = _moved(before, _snapshot(trainer))
    assert base_moved == set() and moved == {n for n in before if "lora_B" in n}
    trainer.close()


def test_sft_steps_move_only_the_adapters(compose_cfg, tiny_model_dir, phantom_dataset, tmp_path):
    cfg = compose_cfg(["method=sft", "engine=zero0", *LORA, "dataset.max_train_samples=4",
                       "trainer.sft_batch_size=4", "optim.lr=1e-2"])
    trainer = SFTTrainer(cfg, tmp_path, str(tiny_model_dir))
    assert trainer.engine.reference is None
    s0 = _snapshot(trainer)
    losses = [trainer.train_step(0)["loss/sft"]]
    s1 = _snapshot(trainer)
    losses.append(trainer.train_step(1)["loss/sft"])
    s2 = _snapshot(trainer)
    adapters = {n for n in s0 if is_adapter_key(n)}
    assert _moved(s0, s1) == ({n for n in adapters if "lora_B" in n}, set())
    assert _moved(s1, s2) == (adapters, set())
    assert losses[1] < losses[0]  # the adapters learn: the same 4 examples, a lower loss


# -- folders: merged, adapter, evaluation ----------------------------------------------------------


def test_merged_and_adapter_folders(lora_grpo, compose_cfg, tmp_path):
    from peft import PeftModel

    trainer, ro, _ = lora_grpo
    final = tmp_path / "final"
    trainer.engine.save_hf(final, trainer.processor)
    assert (final / "adapter" / "adapter_config.json").is_file()
    saved = load_file(final / "adapter" / "adapter_model.safetensors")
    assert saved and all(k.startswith("base_model.model.") for k in saved)
    merged = load_model(final, attn_implementation="sdpa")  # an ordinary HF folder
    assert not any("lora" in n for n, _ in merged.named_parameters())
    adapter = load_adapter_model(final / "adapter", attn_implementation="sdpa")
    peft_model = PeftModel.from_pretrained(
        load_model(trainer.engine.lora.base_model_name_or_path, attn_implementation="sdpa"),
        str(final / "adapter"))
    inputs = model_inputs(ro.batch)
    with torch.no_grad():
        trained = trainer.engine.module(**inputs).logits  # [N, T, V]
        assert torch.equal(adapter(**inputs).logits, trained)
        assert torch.equal(peft_model(**inputs).logits, trained)
        diff = (merged(**inputs).logits - trained).abs().max().item()
        peft_merged = peft_model.merge_and_unload().state_dict()
    assert diff < 1e-5, diff
    ours = merged.state_dict()
    assert all(torch.equal(ours[k], peft_merged[k]) for k in peft_merged)  # = peft's own merge
    # Evaluation from either folder: the same predictions.
    cfg = compose_cfg()
    preds = []
    for name, folder in [("merged", final), ("adapter", final / "adapter")]:
        out = tmp_path / f"eval_{name}"
        metrics = evaluate_checkpoint(checkpoint=str(folder), dataset=cfg.dataset, eval_cfg=cfg.eval,
                                      answer_format=cfg.reward.answer_format, out_dir=out,
                                      progress=False)
        assert metrics["n"] > 0
        preds.append([{k: v for k, v in json.loads(x).items() if k != "confidence"}
                      for x in (out / "predictions.jsonl").read_text().splitlines()])
    assert preds[0] == preds[1]


# -- exact resume (ZeRO-0) -----------------------------------------------------------------------


# τ0 = 0 with the margin check alone: the first full window raises τ (tests/integration/test_resume.py).
CURRICULUM_MOVES = ["curriculum.window=2", "curriculum.tau0=0.0", "curriculum.delta=0.0",
                    "curriculum.check_reward=false", "curriculum.check_stability=false"]


def _comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("time/")}


def test_resume_equals_the_straight_run(compose_cfg, warm_start_dir, tmp_path, metrics_of):
    common = ["engine=zero0", *LORA, "optim.lr=1e-2", "seed=3", "trainer.max_steps=3",
              "trainer.save_every=2", "trainer.sample_every=1", *CURRICULUM_MOVES]
    a, b = tmp_path / "A", tmp_path / "B"
    straight = GRPOTrainer(compose_cfg(common), a, str(warm_start_dir))
    straight.fit()
    straight.close()
    ckpt = a / "checkpoints" / "step_0000002"
    # Adapter-only checkpoint: the adapter folder, the engine state without the frozen base.
    assert not (ckpt / "hf").exists() and (ckpt / "adapter" / "adapter_config.json").is_file()
    engine_bytes = sum(p.stat().st_size for p in (ckpt / "engine").rglob("*") if p.is_file())
    base_bytes = (warm_start_dir / "model.safetensors").stat().st_size
    assert engine_bytes < base_bytes / 2, (engine_bytes, base_bytes)
    # B: what a run killed after its step-2 checkpoint leaves: that checkpoint and rows 0..1.
    (b / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt, b / "checkpoints" / ckpt.name)
    for name in ["metrics.jsonl", "samples.jsonl", "ious.jsonl"]:
        shutil.copy(a / name, b / name)
        runtime.truncate_jsonl(b / name, 1)
    resumed = GRPOTrainer(compose_cfg([*common, "trainer.resume=true"]), b, str(warm_start_dir))
    resumed.fit()
    resumed.close()
    rows_a, rows_b = metrics_of(a), metrics_of(b)
    assert [r["step"] for r in rows_b] == [0, 1, 2]
    assert [_comparable(r) for r in rows_b] == [_comparable(r) for r in rows_a]
    for name in ["samples.jsonl", "ious.jsonl"]:
        assert (a / name).read_text() == (b / name).read_text(), name
    wa, wb = (load_file(r / "final" / "adapter" / "adapter_model.safetensors") for r in (a, b))
    assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
    # Not trivial: rewards vary, the policy left the reference, τ moved, the adapters moved.
    assert rows_a[2]["reward/mean"] > 0 and rows_a[2]["loss/kl"] > 0
    assert rows_a[2]["curriculum/raises"] >= 1
    start = load_file(ckpt / "adapter" / "adapter_model.safetensors")
    assert any(not torch.equal(start[k], wa[k]) for k in wa)


# One arm per kind of run (GRPO with each reward kind, SFT, zero-shot); the peft group is
# orthogonal to the others (tests/configs composes every arm without it).
ARMS = ["medloc", "raw_iou", "v_triune", "sft", "zero_shot"]


def test_arms_compose_with_lora(compose_cfg):
    """Sweeps take ``peft=lora`` as one more override (python -m experiments.sweep NAME -- peft=lora):
    the arms compose with it and keep their own method, reward and schedule."""
    for arm in ARMS:
        plain, lora = compose_cfg([f"arm={arm}"]), compose_cfg([f"arm={arm}", "peft=lora"])
        assert lora.peft.kind == "lora" and plain.peft.kind == "none", arm
        assert (lora.method, lora.reward, lora.curriculum) == \
            (plain.method, plain.reward, plain.curriculum), arm


# -- the memory plan ----------------------------------------------------------------------------


@pytest.mark.parametrize("include_vision", [False, True])
def test_plan_counts_the_adapters_the_engine_injects(tiny_model_dir, include_vision):
    from medloc.engine_plan import lora_parameter_count, shape_from_checkpoint
    from medloc.models.lora import LoraSpec, add_lora

    model = load_model(tiny_model_dir, attn_implementation="sdpa")
    add_lora(model, LoraSpec(r=4, alpha=8, include_vision=include_vision))
    injected = sum(p.numel() for n, p in model.named_parameters() if is_adapter_key(n))
    planned = lora_parameter_count(shape_from_checkpoint(tiny_model_dir), r=4,
                                   target_modules=LANGUAGE_PROJECTIONS,
                                   include_vision=include_vision)
    assert planned == injected > 0


def test_plan_of_lora_frozen_base_no_reference():
    from medloc import engine_plan as ep

    def decide(overrides):
        return ep.plan_for("7b", gpus=1, gpus_per_node=None, gpu_gib=79.2, host_gib=128,
                           overrides=["preset=paper", "dataset=ham10000", "model=qwen2_5_vl_7b",
                                      *overrides])

    full, lora = decide([]), decide(["peft=lora"])
    shape = ep.shape_from_table("7b")
    a = ep.lora_parameter_count(shape, r=64, target_modules=LANGUAGE_PROJECTIONS,
                                include_vision=False)
    # 7B, rank 64 on q k v o gate up down of 28 layers: 64 x 28 x (2 x (3584 + 3584) + 2 x (3584 + 512)
    # + 3 x (3584 + 18944)) = 161,480,704 adapter parameters.
    assert a == 64 * 28 * (2 * (3584 + 3584) + 2 * (3584 + 512) + 3 * (3584 + 18944)) == 161_480_704
    assert (lora.n_params, lora.n_trainable) == (shape.n_params + a, a)
    zero0 = ep.evaluate(ep.ZeroPlan(0), shape=shape, precision="bf16", world_size=1,
                        ranks_per_node=1, reserve_bytes=0, host_reserve_bytes=0, device_bytes=None,
                        host_bytes=None, workload=ep.workload_from_config(
                            ep.compose_run_config(["preset=paper", "dataset=ham10000",
                                                   "model=qwen2_5_vl_7b", "peft=lora"]),
                            with_reference=True))
    update = dict(zero0.phases[-1].terms)
    assert update["weights"] == 2 * (shape.n_params + a)  # frozen bf16 base + bf16 adapters
    assert update["grads"] == 2 * a and update["optimizer"] == 16 * a  # fp32 master, m, v, grad
    assert update["reference"] == 0  # the policy with its adapters off
    # LoRA without vision adapters: the tower runs without grad, once per image of a micro-batch
    # (micro-batch 4 of G = 8 rows: one prompt, one image)
    tower = "vision tower without grad: 1 image(s), once per image per micro-batch"
    assert update[tower] == ep.vision_tower_bytes(shape, images=1, patches=5120, attn="auto",
                                                  act_bytes=2, grad=False, checkpointing=False)
    # The 7B: on one 80 GB GPU with 128 GiB of host RAM full fine-tuning fits nothing; LoRA fits
    # without partitioning or offload.
    assert not full.fits and lora.fits and lora.plan == ep.ZeroPlan(0)


def test_memory_plans_doc_holds_the_lora_table():
    from medloc import engine_plan as ep

    text = (Path(__file__).resolve().parents[2] / "docs" / "memory_plans.md").read_text()
    begin, end = "<!-- what-fits-lora: begin -->\n", "<!-- what-fits-lora: end -->"
    table = text.split(begin, 1)[1].split(end, 1)[0].strip()
    assert table == ep.what_fits(preset="paper", overrides=["peft=lora"])
