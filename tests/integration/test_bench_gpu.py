"""`make bench-gpu` and `experiments/gpu_check.sh` cannot rot, and their floors do the trainer's work.

- The tiny-model run (CPU) goes through the whole bench: the trainer's steps in the reference
  configuration (4 prompts x G=8, gradient checkpointing, micro-batch 8, forced completion
  length), then every floor; the floors' recorded work equals the trainer's (vision-tower images
  and language-model forwards per phase), the tables are labelled, nothing unlabelled follows.
- The row/feature bookkeeping of the replay (which tower output feeds which row), by hand.
- ``--compare-attn`` under the CPU emulation of flash attention: our sampler's log-probs equal the
  training forward's under both implementations, and the comparison shows the bug it exists for
  (the 62cf3b8 masks: flash attention sampling from unwritten static-cache slots).
- ``gpu_check.sh`` in its dry-run mode: every part is there, with the commands a GPU run needs, and
  those commands' modules, arguments and config overrides are valid here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import bench_gpu as bg

REPO = Path(__file__).resolve().parents[2]
# No process-group variables: an in-process Engine of an earlier test set MASTER_PORT, which this
# process still holds; a child inheriting it fails with EADDRINUSE.
DIST = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DIST}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    return env


# ---------------------------------------------------------------------------------------------
# the whole bench on the tiny model
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bench_gpu_tiny_floors_do_the_trainers_work_and_the_output_is_labelled(tmp_path):
    out = tmp_path / "gpu_step.json"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.bench_gpu", "--shape", "tiny", "--steps", "3",
         "--warmup", "1", "--repeats", "3", "--workdir", str(tmp_path / "work"), "--out", str(out)],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # a library warning is one labelled line, never its source line on a line of its own
    assert "warnings.warn(" not in proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines[-1].startswith("written: ")  # nothing unlabelled after the tables
    assert not any(line.lstrip().startswith("{") for line in lines)
    for label in ("Time (seconds per step", "Work per step",
                  "generate (processor, sampling, scoring)", "of which sampling",
                  "reference forward", "policy forward+backward", "optimizer step", "step (all)",
                  "trainer/floor"):
        assert label in proc.stdout, label
    assert "DIFFERENT" not in proc.stdout

    r = json.loads(out.read_text())
    assert r["rows"] == 32 and r["prompts"] == 4 and r["group"] == 8  # 4 prompts x G=8
    assert r["completion_tokens"] == 24  # EOS banned until max_new_tokens: equal work
    assert r["engine_zero_stage"] == 0 and r["micro_batch"] == 8
    assert r["steps"] == 3 and r["repeats"] == 3 and len(r["per_step"]) == 3
    assert r["floor_errors"] == {}
    phases = [row["phase"] for row in r["table"]]
    assert phases == ["generate", "sampling", "reference", "policy", "optimizer", "step"]
    for row in r["table"]:
        assert row["trainer_s"] > 0 and row["floor_s"] > 0 and row["ratio"] > 0, row
    by = {row["phase"]: row for row in r["table"]}
    parts = sum(by[p]["floor_s"] for p in ("generate", "reference", "policy", "optimizer"))
    assert by["step"]["floor_s"] == pytest.approx(parts, abs=1e-12)
    assert by["sampling"]["floor_s"] <= by["generate"]["floor_s"]
    # the optimizer floor stepped the trainer's own optimizer (torch AdamW at ZeRO-0), in full
    assert any(n.startswith("optimizer floor: AdamW.step over the trainer's") for n in r["notes"])

    trainer, floor = r["work"]["trainer"], r["work"]["floor"]
    p_tokens = r["prompt_tokens"]
    # the trainer's sampler: the tower once per image, each prompt prefilled once
    assert trainer["generate"]["tower_images"] == 4 and trainer["generate"]["tower_calls"] == 1
    assert trainer["generate"]["lm_rows_x_tokens"] == [[4, p_tokens]]
    assert floor["generate"]["tower_images"] == 4
    assert floor["generate"]["lm_rows_x_tokens"] == [[4, p_tokens]]
    for phase in ("reference", "policy"):
        t, f = trainer[phase], floor[phase]
        assert (f["tower_calls"], f["tower_images"]) == (t["tower_calls"], t["tower_images"])
        assert f["lm_rows_x_tokens"] == t["lm_rows_x_tokens"], phase
        # tokens through the language model: rows x sequence length, summed over the forwards
        assert t["lm_tokens"] == sum(rows * tok for rows, tok in t["lm_rows_x_tokens"])
        # grpo.shared_prefix_update (default): per micro-batch of 8 rows (one group) a prefix
        # over its 1 prompt [1, P] and a completion pass [8, L-1]; every row once (mu = 1)
        steps = bg.update_forwards([("lm", *f) for f in t["lm_rows_x_tokens"]], p_tokens, 24)
        assert steps == [("shared", 1, 8)] * 4, (phase, steps)
        assert t["lm_tokens"] == 4 * p_tokens + 32 * 23 < 32 * (p_tokens + 24)
    # the work table shows the two passes' tokens and what full sequences would have taken
    assert (f"4 shared-prefix pairs (prefix 4 prompts x {p_tokens} = {4 * p_tokens:,} + "
            f"completions 32 rows x 23 = 736)") in proc.stdout
    assert f"(as full sequences: 32 x {p_tokens + 24} = {32 * (p_tokens + 24):,})" in proc.stdout


def test_bench_gpu_refuses_medians_of_fewer_than_three(capsys):
    with pytest.raises(SystemExit):
        bg.main(["--shape", "tiny", "--steps", "2"])
    assert "must be >= 3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bg.main(["--shape", "tiny", "--floors", "generate,tower"])
    assert "--floors 'generate,tower'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the replay's bookkeeping, by hand
# ---------------------------------------------------------------------------------------------


def test_tower_kind_and_feature_index_by_hand():
    # 32 rows, G=8: 4 images; micro-batches of 8 rows (one image each)
    assert bg.tower_kind(4, 4, 8, 0, 8) == "images"  # the batch's 4 images, once each
    assert bg.tower_kind(1, 4, 8, 8, 8) == "prompts"  # rows 8..16 show image 1 only
    assert bg.tower_kind(8, 4, 8, 8, 8) == "rows"  # one tower input per row (no trainer path now)
    # micro-batches of 12 rows: rows 12..24 show images 1 and 2
    assert bg.tower_kind(2, 4, 8, 12, 12) == "prompts"
    with pytest.raises(ValueError, match="tower run over 3 images"):
        bg.tower_kind(3, 4, 8, 12, 12)
    # row 13 (image 1): output 1 of a run over all images, output 0 of a run over the images of
    # rows 12..24 (images 1, 2), output 1 of a run over rows 12..24 (row 13 - 12)
    assert bg.feature_index("images", 13, 8, 12) == 1
    assert bg.feature_index("prompts", 13, 8, 12) == 0
    assert bg.feature_index("prompts", 17, 8, 12) == 1  # image 2
    assert bg.feature_index("rows", 13, 8, 12) == 1
    with pytest.raises(ValueError, match="kind='pixels'"):
        bg.feature_index("pixels", 0, 8, 0)


def test_update_forwards_reads_shared_prefix_pairs_and_full_forwards_by_hand():
    p, length = 70, 24
    calls = [("tower", 1), ("lm", 1, 70), ("lm", 8, 23), ("lm", 2, 70), ("lm", 12, 23),
             ("lm", 8, 94)]
    assert bg.update_forwards(calls, p, length) == [
        ("tower", 1), ("shared", 1, 8), ("shared", 2, 12), ("full", 8)]
    with pytest.raises(ValueError, match="recorded call 0: a language-model forward over 4 x 70"):
        bg.update_forwards([("lm", 4, 70)], p, length)  # a prefix with no completion pass
    with pytest.raises(ValueError, match="recorded call 1: .* 8 x 50 tokens; expected 94"):
        bg.update_forwards([("tower", 4), ("lm", 8, 50)], p, length)
    with pytest.raises(ValueError, match="prefix over 3 prompts before a completion forward "
                                         "over 2 rows"):
        bg.update_forwards([("lm", 3, 70), ("lm", 2, 23)], p, length)
    with pytest.raises(ValueError, match="completion_tokens=1"):
        bg.update_forwards([("lm", 1, 70)], p, 1)
    # the work line: the two passes' tokens and the full-sequence tokens beside them
    w = bg.Work([("tower", 1), ("lm", 1, 70), ("lm", 8, 23), ("lm", 1, 70), ("lm", 8, 23)])
    text = bg._work_text(w.summary(), "policy", p, length)
    assert ("2 shared-prefix pairs (prefix 2 prompts x 70 = 140 + completions 16 rows x 23 = "
            "368) = 508 LM tokens (as full sequences: 16 x 94 = 1,504)") in text
    full = bg._work_text(bg.Work([("lm", 8, 94)]).summary(), "reference", p, length)
    assert "1 full forwards (8 rows x 94 = 752) = 752 LM tokens" in full
    # update phases compare every forward: a different completion pass is different work
    a = bg.Work([("lm", 1, 70), ("lm", 8, 1)]).summary()
    assert bg._same_work(a, a, "policy")
    assert not bg._same_work(a, bg.Work([("lm", 1, 70), ("lm", 4, 1)]).summary(), "policy")


def test_work_summary_same_work_and_floors_by_hand():
    w = bg.Work([("tower", 4), ("lm", 8, 94), ("lm", 8, 94), ("tower", 1), ("lm", 8, 94)])
    s = w.summary()
    assert (s["tower_calls"], s["tower_images"], s["lm_forwards"]) == (2, 5, 3)
    assert s["lm_tokens"] == 3 * 8 * 94
    gen_trainer = bg.Work([("tower", 4), ("lm", 4, 70)]).summary()
    # a floor that also runs 1-token decode forwards did the same prefill work
    gen_floor = bg.Work([("tower", 4), ("lm", 4, 70), ("lm", 32, 1)]).summary()
    assert bg._same_work(gen_trainer, gen_floor)
    assert not bg._same_work(gen_trainer, bg.Work([("tower", 32), ("lm", 32, 70)]).summary())
    assert bg.parse_floors("all") == bg.FLOORS and bg.parse_floors("none") == ()
    assert bg.parse_floors("optimizer") == ("optimizer",)
    with pytest.raises(ValueError, match="comma list"):
        bg.parse_floors("reference,optimiser")


# ---------------------------------------------------------------------------------------------
# --compare-attn under the CPU emulation of flash attention
# ---------------------------------------------------------------------------------------------


def test_compare_attention_under_emulated_flash_attention_and_the_bug_it_shows(tmp_path,
                                                                               monkeypatch):
    from medloc import generation
    from medloc.models.loading import load_model
    from tests import fa2_emulation

    def load(model_dir, dtype, name):
        model = load_model(model_dir, dtype=dtype, attn_implementation="sdpa")
        return fa2_emulation.use(model) if name == fa2_emulation.NAME else model

    with fa2_emulation.installed() as name:
        good = bg.compare_attention("tiny", name, tmp_path, ["grpo.max_new_tokens=12"], load=load)
        # 62cf3b8's prefill mask: ones over all K static-cache slots, the unwritten ones too
        monkeypatch.setattr(generation, "_prefill_mask", lambda model, prompt, full, static: full)
        bad = bg.compare_attention("tiny", name, tmp_path, ["grpo.max_new_tokens=12"], load=load)
    assert good["rows"] == 32 and good["impl"] == name
    gaps = good["sampler_vs_forward_max_abs"]
    assert gaps["sdpa"] < 1e-4 and gaps[name] < 1e-4, gaps  # fp32: rounding only
    assert good["forward_across_impl_max_abs"] < 1e-4
    assert good["first_token_agree"] == 1.0
    # the same masks are harmless under sdpa (its causal rule hides the unwritten slots), not
    # under flash attention: the sampler's log-probs leave the training forward's
    assert bad["sampler_vs_forward_max_abs"]["sdpa"] < 1e-4
    assert bad["sampler_vs_forward_max_abs"][name] > 1e-2, bad
    text = bg.render_attention(good)
    assert "max |sampler log-prob - training-forward log-prob|" in text


# ---------------------------------------------------------------------------------------------
# gpu_check.sh, dry run
# ---------------------------------------------------------------------------------------------


def _module_args(cmd: str, module: str) -> list[str]:
    """The arguments after ``-m module`` in a shell command line, up to the next operator."""
    words = shlex.split(cmd)
    args = []
    for w in words[words.index(module) + 1:]:
        if w in ("&&", "||", ";") or w.startswith(">"):
            break
        args.append(w)
    return args


def test_gpu_check_dry_run_prints_every_part_with_valid_commands(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "experiments/gpu_check.sh"], cwd=REPO,
                          env=_env(GPU_CHECK_DRY="1", OUT=str(out), GPU_CHECK_PY=sys.executable),
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    parts = re.findall(r"^== (\S+) \(limit (\d+)s\)\n(.*)$", proc.stdout, flags=re.MULTILINE)
    names = [p[0] for p in parts]
    assert names == ["wheels", "plan_zero2", "plan_zero0", "plan_zero3", "nccl", "attention",
                     "bench_zero2", "bench_zero0", "bench_zero3"]
    cmd = {name: c for name, _, c in parts}
    # the parts' limits fit the 10-minute budget together with the wheels and the summary
    assert sum(int(limit) for _, limit, _ in parts) <= 1500  # each cut to what is left anyway
    assert ".whl/*.whl" in cmd["wheels"] and "--target /tmp/site" in cmd["wheels"]

    # NCCL really runs: torchrun with one process and the one-process shortcut off
    assert "MEDLOC_FORCE_COLLECTIVES=1" in cmd["nccl"] and "NCCL_DEBUG=INFO" in cmd["nccl"]
    assert "torch.distributed.run --standalone --nproc_per_node=1 -m medloc.train" in cmd["nccl"]
    # its overrides compose into a valid run config
    from hydra import compose, initialize_config_dir

    from medloc.config import register_configs, to_run_config

    train_args = _module_args(cmd["nccl"], "medloc.train")
    overrides = [a for a in train_args if not a.startswith("hydra.")]
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = to_run_config(compose(config_name="config", overrides=overrides))
    assert cfg.trainer.max_steps == 2

    # flash-attn only when it imports (exit 75 = skipped), then the comparison
    assert "import flash_attn" in cmd["attention"] and "exit 75" in cmd["attention"]
    assert "--compare-attn flash_attention_2" in cmd["attention"]

    # the bench at each engine; every floor once (zero2), the optimizer's at the others
    ap = bg.parser()
    for engine in ("zero2", "zero0", "zero3"):
        args = ap.parse_args(_module_args(cmd[f"bench_{engine}"], "experiments.bench_gpu"))
        assert args.shape == "3b" and args.overrides == [f"engine={engine}"]
        assert args.steps >= 3 and args.repeats >= 3
        assert bg.parse_floors(args.floors) == (bg.FLOORS if engine == "zero2" else ("optimizer",))
        assert args.out == str(out / f"bench_{engine}.json")
        assert f"--stage {engine[-1]}" in cmd[f"plan_{engine}"]

    # every module the commands run exists here, and the plan's flags are the CLI's
    for module in set(re.findall(r"-m ([\w.]+)", proc.stdout)) - {"pip"}:
        assert importlib.util.find_spec(module) is not None, module
    help_text = subprocess.run([sys.executable, "-m", "medloc.engine_plan", "--help"], cwd=REPO,
                               env=_env(), capture_output=True, text=True, check=True).stdout
    for flag in re.findall(r"(--[\w-]+)", cmd["plan_zero2"].split(">")[0]):
        assert flag in help_text, flag

    summary = (out / "summary.md").read_text()
    assert "| nccl | dry |" in summary and "| bench_zero3 | dry |" in summary
    assert "plan peak GiB" in summary
