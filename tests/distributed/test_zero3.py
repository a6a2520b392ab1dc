"""DeepSpeed ZeRO-3 with 2 processes on CPU (gloo), launched with ``torchrun`` (medloc/engine.py,
medloc/grpo/trainer.py, medloc/train.py). The worker script is tests/distributed/_worker.py.

- From one fixed rollout batch (2 prompts x G=4, saved to disk, hand-set advantages), ONE update
  under ZeRO-3 with 2 processes (each rank takes one whole group, micro-batches of 2) and one under
  ZeRO-0 with 1 process (both groups, micro-batches of 2) give the same parameters within 1e-5.
  Adam's first step, lr * g / (|g| + eps), is blind to a constant factor on the gradient (e.g. a
  wrong world-size scaling) and amplifies float noise where |g| ~ eps = 1e-8. So the advantages
  are scaled by 1e-8: every |g| is then well below eps, the step is ~ (lr / eps) * g -- linear in
  the gradient, scale included -- and with lr 0.1 it still moves parameters by ~1e-4..1e-3.
- ``torchrun --nproc_per_node=2 -m medloc.train engine=zero3 debug=cpu_tiny`` (the entry point's
  Hydra main, from the SFT warm start so IoUs are non-zero) runs to the end, writes its
  checkpoints and final policy, and every rank holds the same τ and the same full scheduler state
  (window of the IoUs of BOTH ranks, raise history) after every step; rank 0's metrics.jsonl logs
  that τ.
- Exact resume under ZeRO-3 (the ZeRO-0 case: tests/integration/test_resume.py): the same command
  in another folder is killed -- every rank, ``os._exit``, no cleanup -- when it is about to save
  step 3's checkpoint (after logging step 2); the same command with ``trainer.resume=true``
  restarts from ``step_0000002`` and redoes step 2. Its ``metrics.jsonl`` (every key but
  ``time/*``), samples and IoUs equal the straight run's (the run above), and so do the final
  weights: those are what the restored Adam moments, lr schedule and weight partitions of both
  ranks decide. Step 2's τ decision needs step 1's IoUs in the 2-step window, i.e. the scheduler
  state from the checkpoint. Two more launches: the straight run is shared with the test above.
- SFT under ZeRO-3 with 2 processes, then the evaluation after training: the first step's loss
  (a global token mean: all-reduced counts and sums) equals a one-process ZeRO-0 step's within
  1e-6, and rank 0's evaluation starts only after rank 1 has returned (it does not wait in a
  barrier) and after the training engine is gone (tests/distributed/_worker.py checks both).

Every launch here runs under the tests' NCCL rule (tests/distributed/nccl_rule.py,
``MEDLOC_TEST_NCCL_RULE=1``): a collective of medloc.engine on a tensor it did not put on its
communication device, or an object collective / barrier before that device was bound, fails as
NCCL would fail. The tests check from each rank's counts that the rule saw the collectives.
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

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = "tests/distributed/_worker.py"
KILLED = 57  # the exit code of _worker.py's kill mode
UPDATE = ["optim.lr=0.1", "model.micro_batch_size=2"]
# Raise τ whenever the window's mean IoU reaches it, so the scheduler state changes during the run.
# τ0 = 0: the first full window raises τ whatever IoUs the warm start samples on this CPU (their
# mean differs between machines; with τ0 = 0.05 it stayed below on some), as in test_resume.py.
CURRICULUM_MOVES = ["curriculum.window=2", "curriculum.tau0=0.0", "curriculum.delta=0.0",
                    "curriculum.check_reward=false", "curriculum.check_stability=false"]


@pytest.fixture(scope="module", autouse=True)
def nccl_rule() -> Iterator[None]:
    """Every launch of this module runs under the tests' NCCL rule (the environment is inherited)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(NCCL_RULE_ENV, "1")
        yield


def rule_counts(out: Path, world: int) -> list[dict[str, int]]:
    """Per rank, how many calls of each collective passed the NCCL rule."""
    return [json.loads((out / f"nccl_rule_rank{r}.json").read_text()) for r in range(world)]



def test_zero3_two_processes_equals_zero0_one_process(cli, rollout_batch, tiny_model_dir,
                                                      tmp_path):
    params, metrics = {}, {}
    for engine, nproc in [("zero0", 1), ("zero3", 2)]:
        out = tmp_path / engine
        cli([f"engine={engine}", *UPDATE], nproc=nproc, script=WORKER,
            script_args=["update", str(rollout_batch), str(out)], timeout=400)
        params[engine] = load_file(out / "after" / "model.safetensors")
        metrics[engine] = json.loads((out / "metrics.json").read_text())
    # 8 rows in micro-batches of 2: 4 accumulation steps on 1 process, 2 per rank on 2.
    assert (metrics["zero0"]["world_size"], metrics["zero0"]["micro_steps"]) == (1, 4)
    assert (metrics["zero3"]["world_size"], metrics["zero3"]["micro_steps"]) == (2, 2)
    # Loss metrics are global means, so they agree too.
    for key in ["loss/policy", "loss/kl", "loss/total"]:
        assert metrics["zero3"][key] == pytest.approx(metrics["zero0"][key], abs=1e-6), key

    p0, p3 = params["zero0"], params["zero3"]
    start = load_file(tiny_model_dir / "model.safetensors")
    assert set(p0) == set(p3) == set(start)
    assert all(t.dtype == torch.float32 for t in p3.values())
    diffs = {k: (p3[k] - p0[k]).abs().max().item() for k in p0}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] < 1e-5, (worst, diffs[worst])
    moved = {k: (p0[k] - start[k]).abs().max().item() for k in p0}
    assert min(moved.values()) > 0  # every tensor was updated
    # Linear regime (all |g| < eps, so every step is below lr / 2) and far above the tolerance.
    assert 1e-4 < max(moved.values()) < 0.05, max(moved.values())
    # Under the NCCL rule: the update's global counts and the finite-loss checks, on both ranks.
    assert all(c.get("all_reduce", 0) >= 4 for c in rule_counts(tmp_path / "zero3", 2))


TRAIN = ["engine=zero3", "trainer.max_steps=3", "trainer.save_every=2", *CURRICULUM_MOVES]


@pytest.fixture(scope="module")
def straight_run(cli, warm_start_dir, tmp_path_factory) -> tuple[Path, Path]:
    """``torchrun --nproc_per_node=2 -m medloc.train engine=zero3 ...``, 3 steps: (run dir, obs)."""
    root = tmp_path_factory.mktemp("zero3_run")
    run_dir, obs = root / "run", root / "observed"
    cli([*TRAIN, f"hydra.run.dir={run_dir}", f"init_from={warm_start_dir}"],
        nproc=2, script=WORKER, script_args=["train", str(obs)], timeout=500)
    return run_dir, obs


def test_zero3_cli_run_holds_the_same_tau_on_every_rank(straight_run, metrics_of):
    run_dir, obs = straight_run
    rank0 = [json.loads(x) for x in (obs / "tau_rank0.jsonl").read_text().splitlines()]
    rank1 = [json.loads(x) for x in (obs / "tau_rank1.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rank0] == [0, 1, 2]
    assert rank0 == rank1  # τ, window contents and raise history, bit for bit
    # The window holds the IoUs of both ranks: 2 prompts x G=4 = 8 per step, not 4.
    entries = rank0[-1]["state"]["tracker"]["entries"]
    assert entries and all(len(e) == 8 for e in entries)
    assert any(iou > 0 for e in entries for iou in e)  # warm start: real overlaps, not all zero
    assert rank0[-1]["state"]["history"]  # τ was raised during the run: the shared τ moved

    rows = metrics_of(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert [r["curriculum/tau"] for r in rows] == [r["tau_used"] for r in rank0]
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} == {"step_0000002",
                                                                    "step_0000003"}
    final = load_model(run_dir / "final")  # gathered from the partitions, loads like any HF folder
    assert sum(p.numel() for p in final.parameters()) > 0
    for counts in rule_counts(obs, 2):  # every kind of collective the GRPO run makes passed
        assert counts["all_gather"] == 3  # the IoUs of each step
        assert counts["all_reduce"] > 3 and counts["broadcast_object_list"] >= 3
        assert counts["barrier"] > 0


def _comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("time/")}


def test_zero3_kill_and_resume_equals_the_straight_run(cli, warm_start_dir, straight_run, tmp_path,
                                                       metrics_of):
    a = straight_run[0]
    b = tmp_path / "B"
    cmd = [*TRAIN, f"hydra.run.dir={b}", f"init_from={warm_start_dir}"]
    killed = cli(cmd, nproc=2, script=WORKER, script_args=["kill", "3", str(tmp_path / "obs_b")],
                 timeout=500, check=False)
    # torchrun reports the ranks' exit code: the kill, not some other failure
    assert killed.returncode != 0 and re.search(rf"exitcode\s*:\s*{KILLED}\b", killed.stderr), \
        killed.stderr[-3000:]
    assert [p.name for p in (b / "checkpoints").iterdir()] == ["step_0000002"]
    assert [r["step"] for r in metrics_of(b)] == [0, 1, 2] and not (b / "final").exists()

    resumed = cli([*cmd, "trainer.resume=true"], nproc=2, script=WORKER,
                  script_args=["train", str(tmp_path / "obs_b2")], timeout=500)
    assert f"resumed from {b / 'checkpoints' / 'step_0000002'} at step 2" in resumed.stdout

    a_rows, b_rows = metrics_of(a), metrics_of(b)
    assert [r["step"] for r in b_rows] == [0, 1, 2]  # the killed run's row 2 was replaced
    assert [_comparable(r) for r in b_rows] == [_comparable(r) for r in a_rows]
    for name in ["samples.jsonl", "ious.jsonl"]:  # samples: steps 0 and 2
        assert (a / name).read_text() == (b / name).read_text(), name
    wa, wb = (load_file(r / "final" / "model.safetensors") for r in (a, b))
    assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
    # Not trivial: rewards, a moved policy, and a τ decision at step 2 from a window that holds
    # step 1's IoUs (restored); after the resume both ranks hold the same scheduler state.
    # (On policy, mu=1, the policy loss's VALUE is -mean(advantages) = 0 up to rounding, since
    # groups are zero-mean: live groups and a gradient show the policy moved, not loss/policy.)
    assert a_rows[2]["reward/mean"] > 0 and a_rows[2]["loss/kl"] > 0
    assert a_rows[2]["reward/dead_group_frac"] < 1 and a_rows[2]["optim/grad_norm"] > 0
    assert a_rows[2]["curriculum/window_margin"] is not None
    assert (tmp_path / "obs_b2" / "tau_rank0.jsonl").read_text() == \
        (tmp_path / "obs_b2" / "tau_rank1.jsonl").read_text()


SFT = ["method=sft", "engine=zero3", "trainer.max_steps=2", "trainer.save_every=0",
       "trainer.sft_batch_size=4", "trainer.eval_after=true", "dataset.max_eval_samples=2",
       "eval.batch_size=2"]


def test_zero3_sft_two_processes_then_evaluation(cli, compose_cfg, tiny_model_dir, tmp_path,
                                                 metrics_of):
    run_dir, obs = tmp_path / "sft", tmp_path / "obs_sft"
    cli([*SFT, f"hydra.run.dir={run_dir}"], nproc=2, script=WORKER,
        script_args=["train", str(obs)], timeout=400)
    rows = metrics_of(run_dir)
    assert [r["step"] for r in rows] == [0, 1]
    assert (run_dir / "eval" / "metrics.json").is_file()
    assert json.loads((obs / "evaluation_started_after_peers").read_text()) == {"world": 2}
    for counts in rule_counts(obs, 2):
        assert counts["all_reduce"] >= 4 and counts["broadcast_object_list"] >= 3
        assert counts["barrier"] > 0

    # The same first step on one process (ZeRO-0, in-process): the same global token mean.
    from medloc.sft import SFTTrainer

    one = [o for o in SFT if not o.startswith(("engine=", "trainer.max_steps"))]
    cfg = compose_cfg([*one, "engine=zero0", "trainer.max_steps=1"])
    SFTTrainer(cfg, tmp_path / "sft_one", str(tiny_model_dir)).fit()
    single = metrics_of(tmp_path / "sft_one")[0]["loss/sft"]
    assert rows[0]["loss/sft"] == pytest.approx(single, abs=1e-6) and single > 0
