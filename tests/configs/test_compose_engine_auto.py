"""``engine.zero_stage`` takes a stage or "auto" (medloc/config.py EngineConfig, conf/engine/auto.yaml);
the paper preset uses auto, the root default stays the paper's ZeRO-3, a named stage overrides. The
memory plan's ASSUMED fields are config values; the workload it reads comes from the config."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from medloc import engine_plan
from medloc.config import EngineConfig, RunConfig, register_configs, to_run_config

CONF = Path(__file__).resolve().parents[2] / "conf"

register_configs()


def _compose(overrides: list[str]) -> RunConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return to_run_config(cfg)


def test_engine_auto_group_and_paper_preset():
    assert _compose(["engine=auto"]).engine.zero_stage == "auto"
    paper = _compose(["preset=paper"])
    assert paper.engine.zero_stage == "auto"
    e = paper.engine  # the ASSUMED values of the plan, documented in conf/engine/auto.yaml
    assert (e.auto_reserve_gib, e.auto_host_reserve_gib_per_rank, e.auto_prompt_text_tokens) == (
        6.0, 4.0, 128)
    assert e.auto_headroom_gib is None
    assert not paper.engine.offload_optimizer and not paper.engine.offload_params
    # Every paper-preset experiment composes with it (7B, 32B included).
    for model in ("qwen2_5_vl_3b", "qwen2_5_vl_7b", "qwen2_5_vl_32b"):
        assert _compose(["preset=paper", f"model={model}"]).engine.zero_stage == "auto"
    assert _compose(["experiment=scale", "preset=paper"]).engine.zero_stage == "auto"


@pytest.mark.parametrize(
    "overrides,stage,offload",
    [
        ([], 3, False),  # the root default: the paper's ZeRO-3
        (["preset=paper", "engine=zero2"], 2, False),  # a named stage overrides auto
        (["preset=paper", "engine.zero_stage=0"], 0, False),
        (["preset=paper", "engine=zero3_offload"], 3, True),
        (["engine=auto", "engine.zero_stage=1"], 1, False),
    ],
)
def test_a_named_stage_is_an_int(overrides, stage, offload):
    e = _compose(overrides).engine
    assert e.zero_stage == stage and type(e.zero_stage) is int
    assert e.offload_optimizer is offload


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["engine.zero_stage=4"], "engine.zero_stage"),
        (["engine.zero_stage=automatic"], "engine.zero_stage"),
        (["engine.zero_stage=true"], "engine.zero_stage"),
        (["engine=auto", "engine.offload_optimizer=true"], "decides the offload"),
        (["engine=auto", "engine.auto_reserve_gib=-1"], "engine.auto_reserve_gib"),
        (["engine=auto", "engine.auto_host_reserve_gib_per_rank=-1"],
         "engine.auto_host_reserve_gib_per_rank"),
        (["engine=auto", "engine.auto_prompt_text_tokens=-1"], "engine.auto_prompt_text_tokens"),
        # the fixed headroom is gone: an old config that sets it is told what replaced it
        (["engine=auto", "engine.auto_headroom_gib=12"], "engine.auto_reserve_gib"),
    ],
)
def test_bad_engine_values_fail_at_start(overrides, needle):
    with pytest.raises(Exception) as err:
        _compose(overrides)
    assert needle in str(err.value) or needle in str(err.value.__cause__)


def test_engine_config_built_by_hand():
    assert EngineConfig(zero_stage=0).zero_stage == 0  # e.g. experiments/bench_grpo.py
    assert EngineConfig(zero_stage="auto").zero_stage == "auto"
    with pytest.raises(ValueError, match="zero_stage"):
        EngineConfig(zero_stage="3")


def test_the_workload_of_the_paper_preset():
    cfg = _compose(["preset=paper", "dataset=ham10000", "model=qwen2_5_vl_7b"])
    w = engine_plan.workload_from_config(cfg, with_reference=cfg.grpo.beta > 0)
    assert (w.method, w.max_pixels, w.prompt_text_tokens, w.completion_tokens) == (
        "grpo", 1_003_520, 128, 256)
    assert (w.micro_batch, w.num_generations, w.prompts_per_step) == (4, 8, 8)
    assert w.gradient_checkpointing and not w.freeze_vision and w.with_reference
    sft = engine_plan.workload_from_config(_compose(["method=sft"]), with_reference=False)
    assert (sft.method, sft.num_generations, sft.prompts_per_step) == ("sft", 1, 32)
    with pytest.raises(ValueError, match="zero_shot"):
        engine_plan.workload_from_config(_compose(["method=zero_shot"]), with_reference=False)


def test_the_embedded_default_keeps_zero0():
    """The embedded preset names ZeRO-0 (conf/preset/embedded.yaml); on CPU the plan compares
    nothing, so its decision is the one it was before the plan computed activations."""
    cfg = _compose(["preset=embedded"])
    assert cfg.engine.zero_stage == 0 and cfg.model.precision == "fp32"
    w = engine_plan.workload_from_config(cfg, with_reference=cfg.grpo.beta > 0)
    assert w.max_pixels == 12544 and w.completion_tokens == 22
