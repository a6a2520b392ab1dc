"""``peft=lora`` under DeepSpeed ZeRO-3 with 2 processes on CPU (gloo), launched with ``torchrun``
through tests/distributed/_worker.py (the one-process rules: tests/integration/test_lora.py).

- One GRPO update from a fixed rollout batch (2 prompts x G=4, hand-set advantages scaled by 1e-8
  so that Adam's first step is linear in the gradient; tests/distributed/test_zero3.py says why)
  under ZeRO-3 with 2 processes gives the same adapter as under ZeRO-0 with 1 process within 1e-6,
  and the same merged weights; the loss metrics agree within 1e-6.
- Exact resume under ZeRO-3: a 2-process LoRA run killed (every rank, ``os._exit``) when it is about
  to write step 3's checkpoint, then resumed from its adapter-only ``step_0000002`` checkpoint,
  reproduces the straight run's metrics rows (all but ``time/*``), samples, IoUs and final adapter.

Every launch runs under the tests' NCCL rule (tests/distributed/nccl_rule.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from nccl_rule import ENV as NCCL_RULE_ENV
from safetensors.torch import load_file

from medloc.models.loading import load_model

torch.set_num_threads(1)

# heavy (make test-slow only): about 3-4 min of 2-process launches; make test keeps the fast LoRA
# rules (tests/integration/test_lora.py: ZeRO-0/2/3 in one process, resume on ZeRO-0) and the
# 2-process ZeRO-3 equality and resume of the full model (tests/distributed/test_zero3.py).
pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.heavy]

WORKER = "tests/distributed/_worker.py"
KILLED = 57  # the exit code of _worker.py's kill mode
LORA = ["peft=lora", "peft.r=4", "peft.alpha=8"]
UPDATE = ["optim.lr=0.1", "model.micro_batch_size=2"]
CURRICULUM_MOVES = ["curriculum.window=2", "curriculum.tau0=0.05", "curriculum.delta=0.0",
                    "curriculum.check_reward=false", "curriculum.check_stability=false"]
ADAPTER = Path("adapter") / "adapter_model.safetensors"


@pytest.fixture(scope="module", autouse=True)
def nccl_rule() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(NCCL_RULE_ENV, "1")
        yield



def test_lora_zero3_two_processes_equal_zero0_one_process(cli, rollout_batch, tmp_path):
    adapters, merged, metrics = {}, {}, {}
    for engine, nproc in [("zero0", 1), ("zero3", 2)]:
        out = tmp_path / engine
        cli([f"engine={engine}", *LORA, *UPDATE], nproc=nproc, script=WORKER,
            script_args=["update", str(rollout_batch), str(out)], timeout=400)
        adapters[engine] = load_file(out / "after" / ADAPTER)
        merged[engine] = load_file(out / "after" / "model.safetensors")
        metrics[engine] = json.loads((out / "metrics.json").read_text())
    assert (metrics["zero3"]["world_size"], metrics["zero3"]["micro_steps"]) == (2, 2)
    for key in ["loss/policy", "loss/kl", "loss/total"]:
        assert metrics["zero3"][key] == pytest.approx(metrics["zero0"][key], abs=1e-6), key
    a0, a3 = adapters["zero0"], adapters["zero3"]
    assert set(a0) == set(a3) and a0
    worst = max((a3[k] - a0[k]).abs().max().item() for k in a0)
    assert worst < 1e-6, worst
    # Not trivial: B moved from 0 by ~lr / 2 * (g / eps) -- far above the tolerance.
    moved = max(a0[k].abs().max().item() for k in a0 if "lora_B" in k)
    assert 1e-4 < moved < 0.05, moved
    m0, m3 = merged["zero0"], merged["zero3"]
    assert set(m0) == set(m3)
    assert max((m3[k] - m0[k]).abs().max().item() for k in m0) < 1e-6


TRAIN = ["engine=zero3", *LORA, "optim.lr=1e-2", "trainer.max_steps=3", "trainer.save_every=2",
         *CURRICULUM_MOVES]


def _comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("time/")}


def test_lora_zero3_kill_and_resume_equals_the_straight_run(cli, warm_start_dir, tmp_path,
                                                            metrics_of):
    a, b = tmp_path / "A", tmp_path / "B"
    cli([*TRAIN, f"hydra.run.dir={a}", f"init_from={warm_start_dir}"], nproc=2, script=WORKER,
        script_args=["train", str(tmp_path / "obs_a")], timeout=500)
    cmd = [*TRAIN, f"hydra.run.dir={b}", f"init_from={warm_start_dir}"]
    killed = cli(cmd, nproc=2, script=WORKER, script_args=["kill", "3", str(tmp_path / "obs_b")],
                 timeout=500, check=False)
    assert killed.returncode != 0 and re.search(rf"exitcode\s*:\s*{KILLED}\b", killed.stderr), \
        killed.stderr[-3000:]
    ckpt = b / "checkpoints" / "step_0000002"
    assert [p.name for p in (b / "checkpoints").iterdir()] == [ckpt.name]
    assert (ckpt / "adapter" / "adapter_config.json").is_file() and not (ckpt / "hf").exists()
    resumed = cli([*cmd, "trainer.resume=true"], nproc=2, script=WORKER,
                  script_args=["train", str(tmp_path / "obs_b2")], timeout=500)
    assert f"resumed from {ckpt} at step 2" in resumed.stdout

    a_rows, b_rows = metrics_of(a), metrics_of(b)
    assert [r["step"] for r in b_rows] == [0, 1, 2]
    assert [_comparable(r) for r in b_rows] == [_comparable(r) for r in a_rows]
    for name in ["samples.jsonl", "ious.jsonl"]:
        assert (a / name).read_text() == (b / name).read_text(), name
    wa, wb = (load_file(r / "final" / ADAPTER) for r in (a, b))
    assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
    # Not trivial: rewards, a policy that left the reference (KL > 0), adapters that moved after
    # the checkpoint, and the merged final folder loads as an ordinary model.
    assert a_rows[2]["reward/mean"] > 0 and a_rows[2]["loss/kl"] > 0
    at_ckpt = load_file(ckpt / ADAPTER)
    assert any(not torch.equal(at_ckpt[k], wa[k]) for k in wa)
    assert not any("lora" in n for n, _ in load_model(a / "final").named_parameters())
