"""`make bench`: median GRPO step time of medloc's trainer vs TRL's ``GRPOTrainer``, same setup.

    python -m experiments.bench_grpo                 # what `make bench` runs (needs the `bench` extra)
    python -m experiments.bench_grpo --steps 20      # more measured steps

Both trainers run the same work, each in its own fresh subprocess (so each gets its own peak RSS):

- model: the embedded tiny Qwen2.5-VL (``medloc.models.tiny``, "tiny-1m"), the same local HF folder
  loaded with ``Qwen2_5_VLForConditionalGeneration.from_pretrained``; fp32, sdpa attention, no
  gradient checkpointing (TRL's default is on; switched off to match), CPU, one torch thread;
- data: the phantom HAM10000 twin (``data_prep.build.ensure_dataset``); TRL gets a
  ``datasets.Dataset`` built from the same train JSONL (PIL image + the same prompt text in TRL's
  conversational vision format), so both see 112x112 images -> 16 image tokens and the same prompt;
- one optimizer step = B prompts x G samples (one generation, one reference forward, one
  policy forward/backward over all B*G rows, one AdamW step): same G, prompts per step,
  max_new_tokens / max_completion_length, temperature, top_p, top_k off, beta (k3 KL), loss type
  ``grpo``, epsilon 0.2, learning rate (constant), grad clip 1.0, no vLLM;
- reward: parse + IoU (original-image frame) + binary-at-τ + format reward through
  ``medloc.parsing`` / ``medloc.boxes`` / ``medloc.rewards`` on both sides (TRL gets it as a reward
  function; τ fixed at the curriculum's τ0, medloc's scheduler would hold the same value);
- same generated tokens: generation is forced to exactly max_new_tokens on both sides
  (``min_new_tokens = max_new_tokens`` suppresses EOS until then; for medloc it is passed to
  ``medloc.generation.generate``, for TRL through ``generation_kwargs``); the mean completion
  length of each side is measured and printed so this can be checked.

Timing: medloc times ``trainer.train_step(step)`` (data loading, rollout, reward, curriculum,
advantages, update) with ``time.perf_counter``; TRL times each optimizer step with a
``TrainerCallback`` (``on_step_begin`` -> ``on_step_end``, which spans TRL's generation inside
``training_step`` and the optimizer step; logging runs after ``on_step_end`` and is not counted).
The first ``--warmup`` steps are dropped, the median and IQR of the next ``--steps`` are reported.
Peak memory is the process's peak resident set size, ``resource.getrusage(RUSAGE_SELF).ru_maxrss``
(KiB on Linux), read at the end of each subprocess; it includes imports and model loading. The RSS
just before the first step is reported too.

Output: one table on stdout and ``runs/bench/grpo_step.json`` (written atomically).
TRL is a benchmark-only dependency (the ``bench`` extra of pyproject.toml).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal, get_args

from experiments.bench_setup import (
    BenchSetup,
    peak_rss_mib,
    prepare_inputs,
    rss_now_mib,
    run_config,
    set_threads,
    summarize,
)
from medloc.atomic import write_json_atomic
from medloc.logging import console

Side = Literal["medloc", "trl"]


# ---------------------------------------------------------------------------------------------
# medloc side (the TRL side: experiments.bench_trl)
# ---------------------------------------------------------------------------------------------


def run_medloc(setup: BenchSetup) -> dict[str, Any]:
    """Time ``medloc.grpo.trainer.GRPOTrainer.train_step`` (ZeRO-0, one process, fp32)."""
    import torch

    from medloc import generation, runtime
    from medloc.grpo import rollout as rollout_module
    from medloc.grpo.trainer import GRPOTrainer

    set_threads(setup.threads)
    with tempfile.TemporaryDirectory(prefix="bench_medloc_") as tmp:
        cfg = run_config(setup)
        model_path, _ = prepare_inputs(setup)
        trainer = GRPOTrainer(cfg, Path(tmp), model_path)
        # Same generated tokens on both sides: EOS is suppressed until max_new_tokens (the
        # rollout's generate() with min_new_tokens; TRL gets the same through generation_kwargs).
        rollout_module.generate = functools.partial(generation.generate,
                                                    min_new_tokens=setup.max_new_tokens)
        rss_setup = rss_now_mib()
        times, cpu_times, lengths, gen_times = [], [], [], []
        phases: dict[str, list[float]] = {}
        for step in range(setup.warmup + setup.steps):
            runtime.seed_step(cfg.seed, step, 0)
            t0, c0 = time.perf_counter(), time.process_time()
            metrics = trainer.train_step(step)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if step >= setup.warmup:
                times.append(dt)
                cpu_times.append(dc)
                lengths.append(metrics["completion/length"])
                gen_times.append(metrics["time/generate_s"])
                for k, v in metrics.items():
                    if k.startswith("time/") and k.endswith("_s") and not k.endswith("_per_s"):
                        phases.setdefault(k.removeprefix("time/"), []).append(v)
        n_params = sum(p.numel() for p in trainer.engine.module.parameters())
        prompt_tokens = medloc_prompt_tokens(trainer, setup)
        tokens = update_forward_tokens(trainer, setup)
        del trainer
        torch.set_num_threads(setup.threads)
    return {
        "trainer": "medloc",
        "times_s": times,
        "cpu_times_s": cpu_times,
        **summarize(times, cpu_times),
        "median_generate_s": statistics.median(gen_times),
        "mean_completion_length": statistics.fmean(lengths),
        "mean_tokens_per_row": prompt_tokens + statistics.fmean(lengths),
        "rss_before_first_step_mib": rss_setup,
        "peak_rss_mib": peak_rss_mib(),
        "params": n_params,
        "phases_median_s": {k: statistics.median(v) for k, v in phases.items()},
        "update_forward_tokens": tokens,
    }


def update_forward_tokens(trainer: Any, setup: BenchSetup) -> dict[str, int]:
    """Tokens through the language model per update forward (reference, old policy, policy) for
    step 0's prompts: ``per_row`` = N x (P + L) (every row's padded prompt + completion),
    ``shared_prefix`` = B x P + N x (L - 1) (each prompt once, completion tokens 0..L-2 over it;
    ``models.logprobs.shared_prefix_logprobs``), and the one this run used (``used``).
    L = max_new_tokens (generation is forced to it), P the padded prompt length."""
    from medloc.data.collate import encode_prompts
    from medloc.data.prompts import build_messages

    records, images, _ = trainer.load_step_samples(0)
    messages = [build_messages(r.query, im, setup.answer_format) for r, im in zip(records, images)]
    p = int(encode_prompts(trainer.processor, images, messages)["input_ids"].shape[1])
    b, g, length = len(records), setup.num_generations, setup.max_new_tokens
    n = b * g
    out = {"B": b, "N": n, "P": p, "L": length, "per_row": n * (p + length),
           "shared_prefix": b * p + n * (length - 1)}
    out["used"] = out["shared_prefix"] if trainer.cfg.grpo.shared_prefix_update else out["per_row"]
    return out


def medloc_prompt_tokens(trainer: Any, setup: BenchSetup) -> float:
    """Mean prompt length (tokens, padding excluded) of step 0's prompts, encoded as the rollout does."""
    from medloc.data.collate import encode_prompts
    from medloc.data.prompts import build_messages

    records, images, _ = trainer.load_step_samples(0)
    messages = [build_messages(r.query, im, setup.answer_format) for r, im in zip(records, images)]
    batch = encode_prompts(trainer.processor, images, messages)
    return float(batch["attention_mask"].sum(1).float().mean())


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "WANDB_MODE": "disabled", "CUDA_VISIBLE_DEVICES": "",  # both sides on CPU
        "TRL_EXPERIMENTAL_SILENCE": "1",
    })
    return env


def run_side(side: str, setup: BenchSetup) -> dict[str, Any]:
    """Run one side in a fresh Python process; return its result dict."""
    if side not in get_args(Side):
        raise ValueError(f"side={side!r} is not one of {get_args(Side)}")
    with tempfile.TemporaryDirectory(prefix="bench_grpo_") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "experiments.bench_grpo", "--side", side,
               "--result-file", str(out), "--setup-json", json.dumps(asdict(setup))]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=child_env(setup.threads), capture_output=True, text=True,
                              check=False)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(
                f"the {side} side failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n"
                f"{proc.stderr[-8000:]}"
            )
        result = json.loads(out.read_text())
        result["process_wall_s"] = time.perf_counter() - t0
        return result


def pool_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One side's repeated runs -> one row: step times pooled, memory and lengths the worst/mean."""
    times = [t for r in runs for t in r["times_s"]]
    cpu_times = [t for r in runs for t in r["cpu_times_s"]]
    row = {
        "trainer": runs[0]["trainer"],
        **summarize(times, cpu_times),
        "times_s": times,
        "cpu_times_s": cpu_times,
        "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
        "rss_before_first_step_mib": max(r["rss_before_first_step_mib"] for r in runs),
        "mean_completion_length": statistics.fmean(r["mean_completion_length"] for r in runs),
        "mean_tokens_per_row": statistics.fmean(r["mean_tokens_per_row"] for r in runs),
        "params": runs[0]["params"],
        "runs": [{k: v for k, v in r.items() if k not in ("times_s", "cpu_times_s")} for r in runs],
    }
    if "median_generate_s" in runs[0]:
        row["median_generate_s"] = statistics.median(r["median_generate_s"] for r in runs)
    if "phases_median_s" in runs[0]:
        row["phases_median_s"] = {k: statistics.median(r["phases_median_s"][k] for r in runs)
                                  for k in runs[0]["phases_median_s"]}
        row["update_forward_tokens"] = runs[0]["update_forward_tokens"]
    return row


def table(results: list[dict[str, Any]]) -> str:
    """The printed table: one row per trainer, then the TRL/medloc ratios (wall and CPU)."""
    head = (f"{'trainer':<12} {'median s/step':>13} {'IQR s':>7} {'CPU s/step':>10} "
            f"{'peak RSS MiB':>12} {'RSS@start MiB':>13} {'compl. len':>10} {'tokens/row':>10}")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r['trainer']:<12} {r['median_s']:>13.3f} {r['iqr_s']:>7.3f} {r['cpu_median_s']:>10.3f} "
            f"{r['peak_rss_mib']:>12.0f} {r['rss_before_first_step_mib']:>13.0f} "
            f"{r['mean_completion_length']:>10.1f} {r['mean_tokens_per_row']:>10.1f}"
        )
    ours, theirs = results
    if "update_forward_tokens" in ours:
        t = ours["update_forward_tokens"]
        lines.append(
            f"medloc tokens through the language model per update forward: {t['used']} "
            f"(per-row N x (P+L) = {t['N']} x ({t['P']}+{t['L']}) = {t['per_row']}; shared prefix "
            f"B x P + N x (L-1) = {t['B']} x {t['P']} + {t['N']} x {t['L'] - 1} = "
            f"{t['shared_prefix']}, {t['per_row'] / t['shared_prefix']:.2f}x fewer)")
        lines.append("medloc step phases, median s: " + ", ".join(
            f"{k} {v:.3f}" for k, v in ours["phases_median_s"].items()))
    lines.append(
        f"medloc/TRL: {ours['median_s'] / theirs['median_s']:.2f}x median wall s/step, "
        f"{ours['cpu_median_s'] / theirs['cpu_median_s']:.2f}x median CPU s/step")
    lines.append(
        f"ratio TRL/medloc: {theirs['median_s'] / ours['median_s']:.2f}x median wall s/step, "
        f"{theirs['cpu_median_s'] / ours['cpu_median_s']:.2f}x median CPU s/step, "
        f"{theirs['peak_rss_mib'] / ours['peak_rss_mib']:.2f}x peak RSS  (>1: medloc is lighter)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    d = BenchSetup()
    ap.add_argument("--warmup", type=int, default=d.warmup, help="steps dropped before measuring")
    ap.add_argument("--steps", type=int, default=d.steps, help="measured steps per trainer")
    ap.add_argument("--prompts-per-step", type=int, default=d.prompts_per_step, help="B")
    ap.add_argument("--num-generations", type=int, default=d.num_generations, help="G")
    ap.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    ap.add_argument("--threads", type=int, default=d.threads, help="torch threads per process")
    ap.add_argument("--repeats", type=int, default=2,
                    help="run each side this many times, alternating the order (ABBA...); the "
                         "measured steps of all runs are pooled (evens out load drift on a shared "
                         "machine)")
    ap.add_argument("--cache-dir", default=d.cache_dir)
    ap.add_argument("--out", default="runs/bench/grpo_step.json")
    ap.add_argument("--side", choices=get_args(Side), help=argparse.SUPPRESS)
    ap.add_argument("--result-file", help=argparse.SUPPRESS)
    ap.add_argument("--setup-json", help=argparse.SUPPRESS)
    ap.add_argument("--compile-decode", action="store_true",
                    help="medloc with grpo.compile_decode=true (compiled during warm-up)")
    ap.add_argument("--no-shared-prefix", action="store_true",
                    help="medloc with grpo.shared_prefix_update=false (the per-row update forward)")
    a = ap.parse_args(argv)

    if a.side:  # child process: run one side, write its result
        setup = BenchSetup(**json.loads(a.setup_json))
        if a.side == "medloc":
            result = run_medloc(setup)
        else:
            from experiments.bench_trl import run_trl  # needs the `bench` extra

            result = run_trl(setup)
        write_json_atomic(Path(a.result_file), result)
        return 0

    if a.warmup < 2 or a.steps < 10 or a.repeats < 1:
        raise SystemExit(f"need --warmup >= 2, --steps >= 10, --repeats >= 1 "
                         f"(got {a.warmup}, {a.steps}, {a.repeats})")
    setup = BenchSetup(
        prompts_per_step=a.prompts_per_step, num_generations=a.num_generations,
        max_new_tokens=a.max_new_tokens, warmup=a.warmup, steps=a.steps, threads=a.threads,
        cache_dir=a.cache_dir, compile_decode=a.compile_decode,
        shared_prefix_update=not a.no_shared_prefix,
    )
    t_start = time.perf_counter()
    set_threads(setup.threads)
    prepare_inputs(setup)  # build once here, so neither side times or races the build
    console(f"bench: B={setup.prompts_per_step} prompts x G={setup.num_generations}, "
            f"{setup.max_new_tokens} new tokens forced, beta={setup.beta}, loss={setup.loss_type}, "
            f"T={setup.temperature}, {setup.warmup} warm-up + {setup.steps} measured steps "
            f"x {a.repeats} run(s) per trainer, {setup.threads} thread(s), CPU fp32")
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in get_args(Side)}
    for rep in range(a.repeats):
        order = list(get_args(Side)) if rep % 2 == 0 else list(reversed(get_args(Side)))
        for side in order:
            console(f"bench: run {rep + 1}/{a.repeats}: {side} ...")
            r = run_side(side, setup)
            console(f"bench:   median {r['median_s']:.3f} s/step, peak RSS {r['peak_rss_mib']:.0f} MiB")
            runs[side].append(r)
    results = [pool_runs(runs[side]) for side in get_args(Side)]
    ours, theirs = results
    ratio = theirs["median_s"] / ours["median_s"]
    console(table(results))
    console("same work: generation forced to max_new_tokens on both sides (min_new_tokens = "
            "max_new_tokens); compl. len = mean generated tokens per sample, tokens/row = prompt + "
            "completion tokens per sample, as each side measured them.\n"
            "peak RSS = ru_maxrss of each side's own subprocess (imports and model loading included); "
            "RSS@start = resident set just before the first step. CPU s/step = process CPU time.")
    report = {
        "setup": {**asdict(setup), "repeats": a.repeats},
        "results": results,
        "ratio_trl_over_medloc": ratio,
        "ratio_trl_over_medloc_cpu": theirs["cpu_median_s"] / ours["cpu_median_s"],
        "ratio_trl_over_medloc_peak_rss": theirs["peak_rss_mib"] / ours["peak_rss_mib"],
        "memory_method": "resource.getrusage(RUSAGE_SELF).ru_maxrss of each side's subprocess",
        "same_work": ("min_new_tokens = max_new_tokens on both sides; mean completion length and "
                      "prompt+completion tokens per row of each side reported"),
        "timing": "medloc: perf_counter around train_step; TRL: TrainerCallback on_step_begin/on_step_end",
        "total_wall_s": time.perf_counter() - t_start,
    }
    write_json_atomic(Path(a.out), report)
    console(f"wrote {a.out} ({report['total_wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
