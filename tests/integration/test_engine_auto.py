"""``engine.zero_stage=auto`` at trainer start (medloc/base_trainer.py, medloc/engine_plan.py) on the
tiny Qwen2.5-VL, CPU: the shape and parameter counts read from the checkpoint (config.json and
safetensors headers) are the model's, the decision is what the rule says for the given size, world,
GPU and host, it is printed in one line and recorded in run_info.json, and the engine runs the
chosen stage. Then the command (``python -m medloc.engine_plan``) and the table of
docs/memory_plans.md, which is its output.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from medloc import engine_plan
from medloc.engine_plan import CANDIDATES, GIB, Workload, ZeroPlan
from medloc.models.loading import freeze_vision_tower, load_model
from medloc.sft import SFTTrainer

torch.set_num_threads(1)

DOC = Path(__file__).resolve().parents[2] / "docs" / "memory_plans.md"


def test_shape_and_parameter_counts_from_the_checkpoint(tiny_dir):
    model = load_model(tiny_dir, dtype="float32", attn_implementation="sdpa")
    total = sum(p.numel() for p in model.parameters())  # a tied lm_head counts once here too
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    vision = freeze_vision_tower(model)
    assert engine_plan.count_parameters(tiny_dir, freeze_vision=False) == (total, total)
    assert engine_plan.count_parameters(tiny_dir, freeze_vision=True) == (total, total - vision)
    s = engine_plan.shape_from_checkpoint(tiny_dir)
    assert (s.n_params, s.n_vision_params, s.largest_module_params) == (total, vision, largest)
    text, vis = model.config.get_text_config(decoder=True), model.config.vision_config
    assert (s.hidden, s.intermediate, s.layers, s.kv_heads, s.vocab) == (
        text.hidden_size, text.intermediate_size, text.num_hidden_layers,
        text.num_key_value_heads, text.vocab_size)
    assert (s.vision_depth, s.vision_hidden, s.patch_size, s.merge_size) == (
        vis.depth, vis.hidden_size, vis.patch_size, vis.spatial_merge_size)
    # The sizes alone give the same counts as the safetensors headers.
    assert engine_plan.qwen25vl_parameter_counts(model.config) == (total, vision, largest)


# The embedded GRPO workload (conf/preset/embedded.yaml): 112 x 112 phantoms -> 16 image tokens.
TINY = Workload(method="grpo", max_pixels=12544, prompt_text_tokens=128, completion_tokens=22,
                micro_batch=8, num_generations=8, prompts_per_step=4,
                gradient_checkpointing=False, freeze_vision=False, attn_implementation="auto",
                with_reference=True)


def _decide(tiny_dir, zero_stage, device, world=1, host=512 * GIB, precision="bf16"):
    return engine_plan.decide(
        zero_stage=zero_stage, offload_optimizer=False, offload_params=False, precision=precision,
        model_path=tiny_dir, world_size=world, workload=TINY, reserve_gib=6.0,
        host_reserve_gib=4.0, device=device, host_bytes=host, ranks=world)


def test_decide_auto_and_named_stages(tiny_dir):
    n, _ = engine_plan.count_parameters(tiny_dir, freeze_vision=False)
    # ~1M parameters fit any GPU: ZeRO-0, on one process or four.
    for world in (1, 4):
        d = _decide(tiny_dir, "auto", (80 * GIB, "NVIDIA H100 80GB HBM3"), world)
        assert d.plan == ZeroPlan(0) and d.fits and d.chosen_by == "auto"
        update = dict(d.chosen.phases[-1].terms)
        # 2N weights + 2N grads + 16N optimizer + 2N reference
        assert sum(update[k] for k in ("weights", "grads", "optimizer", "reference")) == 22 * n
        assert [c.plan for c in d.candidates] == list(CANDIDATES)
    # A GPU of 6 GiB leaves nothing beside the reserve: nothing fits, said so.
    d = _decide(tiny_dir, "auto", (6 * GIB, "toy"))
    assert not d.fits and "DOES NOT FIT the GPU" in d.line() and d.plan == CANDIDATES[-1]
    # A host of 4 GiB per process is all reserve: nothing fits the host.
    d = _decide(tiny_dir, "auto", (80 * GIB, "H100"), host=4 * GIB)
    assert not d.fits and "DOES NOT FIT the host RAM" in d.line()
    # A named stage is used as configured; its plan is still reported.
    d = _decide(tiny_dir, 3, (80 * GIB, "NVIDIA H100 80GB HBM3"), 2)
    assert d.plan == ZeroPlan(3) and d.chosen_by == "config" and len(d.candidates) == 1
    assert "ZeRO-3 (engine.zero_stage=3) on 2 process(es)" in d.line()
    # No GPU: stage 0, memory not compared (the embedded default on CPU, fp32).
    d = _decide(tiny_dir, "auto", (None, "cpu"), precision="fp32")
    assert d.plan == ZeroPlan(0) and d.fits and "no GPU" in d.line()


def test_the_one_start_line_names_stage_peak_terms_and_memory(tiny_dir):
    line = _decide(tiny_dir, "auto", (80 * GIB, "NVIDIA H100 80GB HBM3")).line()
    assert "\n" not in line
    for needle in ("[engine] ZeRO-0 (engine.zero_stage=auto) on 1 process(es)", "per-GPU peak",
                   "weights", "grads", "optimizer", "reference", "activations", "logits",
                   "reserve 6.0 GiB", "vs 80.0 GiB of NVIDIA H100", "host", "model load",
                   "vs 512.0 GiB: fits"):
        assert needle in line, (needle, line)


def test_trainer_start_decides_logs_and_records(compose_cfg, tiny_model_dir, phantom_dataset,
                                                tmp_path, capsys):
    (tmp_path / "run_info.json").write_text(json.dumps({"method": "sft", "seed": 0}))
    cfg = compose_cfg(["method=sft", "engine=auto"])
    assert cfg.engine.zero_stage == "auto"
    trainer = SFTTrainer(cfg, tmp_path, str(tiny_model_dir))
    assert trainer.zero.plan == ZeroPlan(0)  # CPU: no GPU memory to fit
    assert trainer.engine.spec.zero_stage == 0 and not trainer.engine.spec.offload_optimizer
    out = capsys.readouterr().out
    assert "[engine] ZeRO-0 (engine.zero_stage=auto)" in out and "no GPU" in out
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["method"] == "sft"  # what was there stays
    assert info["engine"]["stage"] == 0 and info["engine"]["chosen_by"] == "auto"
    assert info["engine"]["n_params"] == engine_plan.count_parameters(
        tiny_model_dir, freeze_vision=False)[0]
    assert info["engine"]["device_bytes"] is None  # CPU
    assert list(info["engine"]["plan_bytes"]["phases"]) == ["update"]  # SFT: the update only


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------


def test_the_command_prints_every_candidate_and_the_choice(capsys):
    assert engine_plan.main(["--model", "7b", "--gpus", "4", "--gpu-gib", "79.2",
                             "--host-gib", "512"]) == 0
    out = capsys.readouterr().out
    # ZeRO-2 fits since the tower runs once per image and the update shares the prompt's prefix
    assert out.startswith("[engine] ZeRO-2 (engine.zero_stage=auto) on 4")
    for plan in CANDIDATES:
        assert re.search(rf"^{re.escape(plan.label)}: ", out, re.MULTILINE), plan.label
    assert out.count("<- chosen") == 1
    assert "ZeRO-2: fits <- chosen" in out
    for needle in ("generate: decode", "reference forward", "update", "generation gather",
                   "KV cache: 16 rows x 1664 slots",
                   "activations: prefix 1 x 1408 + completions 4 x 255 tokens",
                   "peak + reserve", "optimizer offload", "(of 512.0)"):  # offload: still evaluated
        assert needle in out, needle
    # markdown, explicit workload flags, a named stage
    assert engine_plan.main(["--model", "3b", "--gpus", "1", "--gpu-gib", "139.8", "--markdown",
                             "--stage", "0", "--micro-batch", "2", "--max-new-tokens", "64",
                             "--no-gradient-checkpointing", "--no-reference"]) == 0
    out = capsys.readouterr().out
    assert "### ZeRO-0: fits <- chosen" in out and "| phase | per-GPU GiB | terms |" in out
    # the shared-prefix update: 1 prompt x (1280 + 128) + 2 rows x (64 - 1)
    assert "activations: prefix 1 x 1408 + completions 2 x 63 tokens, checkpointing off" in out
    update = next(line for line in out.splitlines() if line.startswith("| update |"))
    assert "reference forward" not in out and "reference" not in update  # grpo.beta=0
    assert "weights" in update


def test_the_command_on_a_checkpoint_and_its_errors(tiny_dir, capsys):
    assert engine_plan.main(["--model", str(tiny_dir), "--preset", "embedded"]) == 0
    out = capsys.readouterr().out
    assert "[engine] ZeRO-0 (engine.zero_stage=auto)" in out and "no GPU" in out
    assert engine_plan.main(["--model", "13b"]) == 2
    assert "expected one of" in capsys.readouterr().err
    assert engine_plan.main(["--model", "3b", "--offload-optimizer"]) == 2
    assert "named --stage" in capsys.readouterr().err


def test_docs_table_is_the_commands_output():
    """docs/memory_plans.md holds the output of ``python -m medloc.engine_plan --what-fits``
    between its markers: regenerate it when the plan changes."""
    text = DOC.read_text()
    begin, end = "<!-- what-fits: begin -->\n", "<!-- what-fits: end -->"
    assert begin in text and end in text
    table = text.split(begin, 1)[1].split(end, 1)[0].strip()
    assert table == engine_plan.what_fits(preset="paper", overrides=[])


@pytest.mark.parametrize("name", ["3b", "7b", "32b"])
def test_every_named_size_composes_with_its_model_config(name):
    cfg = engine_plan.compose_run_config(engine_plan._preset_overrides("paper", name))
    assert cfg.model.name == f"qwen2.5-vl-{name}" and cfg.dataset.max_pixels == 1_003_520
