"""``engine.zero_stage=auto`` at trainer start (medloc/base_trainer.py, medloc/engine_plan.py) on the
tiny Qwen2.5-VL, CPU: the parameter counts read from the checkpoint's safetensors headers are the
model's, the decision is what the rule says for the given size, world and GPU memory, it is printed
in one line and recorded in run_info.json, and the engine runs the chosen stage.
"""

from __future__ import annotations

import json

import torch

from medloc import engine_plan
from medloc.engine_plan import GIB, ZeroPlan
from medloc.models.loading import freeze_vision_tower, load_model
from medloc.sft import SFTTrainer

torch.set_num_threads(1)


def test_parameter_counts_from_the_safetensors_headers(tiny_dir):
    model = load_model(tiny_dir, dtype="float32", attn_implementation="sdpa")
    total = sum(p.numel() for p in model.parameters())  # a tied lm_head counts once here too
    vision = freeze_vision_tower(model)
    assert engine_plan.count_parameters(tiny_dir, freeze_vision=False) == (total, total)
    assert engine_plan.count_parameters(tiny_dir, freeze_vision=True) == (total, total - vision)


def _decide(tiny_dir, zero_stage, device, world=1):
    return engine_plan.decide(
        zero_stage=zero_stage, offload_optimizer=False, offload_params=False, headroom_gib=12.0,
        precision="bf16", model_path=tiny_dir, freeze_vision=False, world_size=world,
        with_reference=True, device=device)


def test_decide_auto_and_named_stages(tiny_dir):
    n, _ = engine_plan.count_parameters(tiny_dir, freeze_vision=False)
    # ~1M parameters x 22 bytes fit any GPU: ZeRO-0, on one process or four.
    for world in (1, 4):
        d = _decide(tiny_dir, "auto", (80 * GIB, "NVIDIA H100 80GB HBM3"), world)
        assert d.plan == ZeroPlan(0) and d.fits and d.chosen_by == "auto"
        assert d.estimate.peak == 22 * n  # 2N weights + 2N grads + 16N optimizer + 2N reference
    # A GPU of 12 GiB + 1 byte leaves 1 byte beside the headroom: nothing fits.
    d = _decide(tiny_dir, "auto", (12 * GIB + 1, "toy"))
    assert not d.fits and "DOES NOT FIT" in d.line()
    # A named stage is used as configured; its estimate is still reported.
    d = _decide(tiny_dir, 3, (80 * GIB, "NVIDIA H100 80GB HBM3"), 2)
    assert d.plan == ZeroPlan(3) and d.chosen_by == "config"
    assert "ZeRO-3 (engine.zero_stage=3) on 2 process(es)" in d.line()
    # No GPU: stage 0, memory not compared.
    d = _decide(tiny_dir, "auto", (None, "cpu"))
    assert d.plan == ZeroPlan(0) and "no GPU" in d.line()


def test_the_one_start_line_names_stage_bytes_and_memory(tiny_dir):
    line = _decide(tiny_dir, "auto", (80 * GIB, "NVIDIA H100 80GB HBM3")).line()
    assert "\n" not in line
    for needle in ("[engine] ZeRO-0 (engine.zero_stage=auto) on 1 process(es)", "weights",
                   "grads", "optimizer", "reference", "headroom 12.0", "vs 80.0 GiB of NVIDIA H100",
                   "fits"):
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
    assert "[engine] ZeRO-0 (engine.zero_stage=auto)" in out
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["method"] == "sft"  # what was there stays
    assert info["engine"]["stage"] == 0 and info["engine"]["chosen_by"] == "auto"
    assert info["engine"]["n_params"] == engine_plan.count_parameters(
        tiny_model_dir, freeze_vision=False)[0]
    assert info["engine"]["device_bytes"] is None  # CPU
