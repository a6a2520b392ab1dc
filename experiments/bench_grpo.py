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
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from medloc.atomic import write_json_atomic

Side = Literal["medloc", "trl"]

# The phantom twin the bench trains on: small, easy targets at 112x112 (16 image tokens).
BENCH_PIXELS = 112 * 112  # min_pixels = max_pixels: every image becomes 112x112 for the model
BENCH_PHANTOM_IMAGES = 64


@dataclass(frozen=True)
class BenchSetup:
    """The shared settings of both trainers (one place, so the two sides cannot drift apart)."""

    prompts_per_step: int = 2  # B
    num_generations: int = 8  # G (paper default)
    max_new_tokens: int = 24  # enough for the tiny model's bare_list answer (~16 tokens)
    temperature: float = 0.9
    top_p: float = 1.0
    beta: float = 0.04
    loss_type: str = "grpo"  # token-mean per sequence, then mean over sequences
    epsilon: float = 0.2
    lr: float = 5e-5
    grad_clip: float = 1.0
    warmup: int = 2
    steps: int = 10
    seed: int = 0
    threads: int = 1
    answer_format: str = "bare_list"
    model_size: str = "tiny-1m"
    cache_dir: str = "cache"

    @property
    def model_dir(self) -> Path:
        return Path(self.cache_dir) / "models" / self.model_size

    @property
    def data_dir(self) -> Path:
        return Path(self.cache_dir) / "bench" / "data" / "phantom_ham10000"

    @property
    def raw_dir(self) -> Path:
        return Path(self.cache_dir) / "bench" / "data" / "raw" / "phantom_ham10000"


# ---------------------------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------------------------


def run_config(setup: BenchSetup, run_dir: Path) -> Any:
    """The medloc RunConfig of the bench (built in code, no Hydra)."""
    from medloc.config import (
        DatasetConfig,
        EngineConfig,
        GRPOConfig,
        LoggerConfig,
        ModelConfig,
        OptimConfig,
        PhantomConfig,
        RewardConfig,
        RunConfig,
        TrainerConfig,
    )

    rows = setup.prompts_per_step * setup.num_generations
    return RunConfig(
        method="grpo",
        seed=setup.seed,
        cache_dir=setup.cache_dir,
        data_root=str(setup.data_dir.parent),
        dataset=DatasetConfig(
            name="phantom_ham10000", kind="ham10000", dir=str(setup.data_dir),
            raw_dir=str(setup.raw_dir), min_pixels=BENCH_PIXELS, max_pixels=BENCH_PIXELS,
            phantom=PhantomConfig(preset="easy", n_images=BENCH_PHANTOM_IMAGES,
                                  image_size=[112, 112], seed=setup.seed),
        ),
        model=ModelConfig(
            name=setup.model_size, path=str(setup.model_dir), build_tiny=setup.model_size,
            precision="fp32", attn_implementation="sdpa", gradient_checkpointing=False,
            micro_batch_size=rows,  # one forward/backward over all B*G rows, as TRL does here
        ),
        reward=RewardConfig(answer_format=setup.answer_format),
        grpo=GRPOConfig(
            num_generations=setup.num_generations, temperature=setup.temperature,
            top_p=setup.top_p, max_new_tokens=setup.max_new_tokens, beta=setup.beta,
            eps_low=setup.epsilon, eps_high=setup.epsilon, mu=1, aggregation=setup.loss_type,
        ),
        optim=OptimConfig(lr=setup.lr, weight_decay=0.0, warmup_steps=0, grad_clip=setup.grad_clip),
        engine=EngineConfig(zero_stage=0),
        trainer=TrainerConfig(
            max_steps=setup.warmup + setup.steps, prompts_per_step=setup.prompts_per_step,
            save_every=10**6, sample_every=0, eval_after=False,
        ),
        logger=LoggerConfig(progress=False),
    )


def prepare_inputs(setup: BenchSetup) -> tuple[str, Path]:
    """Build the tiny model and the phantom data once (outside any timed region)."""
    from data_prep.build import ensure_dataset
    from medloc.prepare import ensure_model

    cfg = run_config(setup, Path("."))
    return ensure_model(cfg.model), ensure_dataset(cfg.dataset)


def rss_now_mib() -> float:
    """Current resident set size of this process (VmRSS), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux), MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def summarize(times: list[float], cpu_times: list[float]) -> dict[str, float]:
    """Median and inter-quartile range (q75 - q25, 'inclusive' quartiles) of step times, seconds:
    wall clock (``*_s``) and this process's CPU time (``cpu_*_s``; with one torch thread it is
    close to the wall time on an idle machine and less sensitive to other load on a shared one)."""
    if len(times) < 2 or len(cpu_times) != len(times):
        raise ValueError(f"need >= 2 measured steps with a CPU time each, got {len(times)}, "
                         f"{len(cpu_times)}")
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    c1, _, c3 = statistics.quantiles(cpu_times, n=4, method="inclusive")
    return {"median_s": statistics.median(times), "iqr_s": q3 - q1, "mean_s": statistics.fmean(times),
            "min_s": min(times), "max_s": max(times),
            "cpu_median_s": statistics.median(cpu_times), "cpu_iqr_s": c3 - c1}


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# medloc side
# ---------------------------------------------------------------------------------------------


def run_medloc(setup: BenchSetup) -> dict[str, Any]:
    """Time ``medloc.grpo.trainer.GRPOTrainer.train_step`` (ZeRO-0, one process, fp32)."""
    import torch

    from medloc import generation, runtime
    from medloc.grpo import rollout as rollout_module
    from medloc.grpo.trainer import GRPOTrainer

    set_threads(setup.threads)
    with tempfile.TemporaryDirectory(prefix="bench_medloc_") as tmp:
        cfg = run_config(setup, Path(tmp))
        model_path, _ = prepare_inputs(setup)
        trainer = GRPOTrainer(cfg, Path(tmp), model_path)
        # Same generated tokens on both sides: EOS is suppressed until max_new_tokens (the
        # rollout's generate() with min_new_tokens; TRL gets the same through generation_kwargs).
        rollout_module.generate = functools.partial(generation.generate,
                                                    min_new_tokens=setup.max_new_tokens)
        rss_setup = rss_now_mib()
        times, cpu_times, lengths, gen_times = [], [], [], []
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
        n_params = sum(p.numel() for p in trainer.engine.module.parameters())
        prompt_tokens = medloc_prompt_tokens(trainer, setup)
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
    }


def medloc_prompt_tokens(trainer: Any, setup: BenchSetup) -> float:
    """Mean prompt length (tokens, padding excluded) of step 0's prompts, encoded as the rollout does."""
    from medloc.data.collate import encode_prompts
    from medloc.data.prompts import build_messages

    records, images, _ = trainer.load_step_samples(0)
    messages = [build_messages(r.query, im, setup.answer_format) for r, im in zip(records, images)]
    batch = encode_prompts(trainer.processor, images, messages)
    return float(batch["attention_mask"].sum(1).float().mean())


# ---------------------------------------------------------------------------------------------
# TRL side
# ---------------------------------------------------------------------------------------------


def trl_dataset(setup: BenchSetup, data_dir: Path) -> Any:
    """The phantom train split as a ``datasets.Dataset`` in TRL's conversational vision format."""
    from datasets import Dataset

    from medloc.data.dataset import GroundingDataset
    from medloc.data.prompts import build_prompt_text

    ds = GroundingDataset(data_dir / "train.jsonl")
    rows = []
    for i in range(len(ds)):
        sample = ds[i]
        r = sample.record
        text = build_prompt_text(r.query, setup.answer_format)  # the text medloc's prompt holds
        rows.append({
            "image": sample.image,
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
            "box": [float(v) for v in r.box],
            "height": int(r.height),
            "width": int(r.width),
        })
    return Dataset.from_list(rows)


def make_trl_reward(setup: BenchSetup, tau: float, op: str, factor: int) -> Any:
    """A TRL reward function doing medloc's work: parse, IoU in the original frame, binary at τ +
    format (weights 1 and 1, as medloc's default reward)."""
    import numpy as np

    from medloc.boxes import model_input_hw, pairwise_iou, to_original_frame
    from medloc.parsing import parse_completion
    from medloc.rewards import accuracy_reward, combine_rewards, format_reward

    def grounding_reward(completions: list[Any], box: list[list[float]], height: list[int],
                         width: list[int], **_: Any) -> list[float]:
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        parsed = [parse_completion(t, setup.answer_format) for t in texts]
        pred = []
        for p, h, w in zip(parsed, height, width):
            hw_in = model_input_hw(h, w, factor=factor, min_pixels=BENCH_PIXELS, max_pixels=BENCH_PIXELS)
            pred.append(None if p.box is None else to_original_frame(p.box, hw_in, (h, w)))
        ious = np.asarray(pairwise_iou(pred, np.asarray(box, dtype=np.float64)), dtype=np.float64)
        total, _ = combine_rewards(
            {"accuracy": accuracy_reward(ious, "binary", tau, op), "format": format_reward(parsed)},
            {"accuracy": 1.0, "format": 1.0},
        )
        return total.tolist()

    return grounding_reward


def run_trl(setup: BenchSetup) -> dict[str, Any]:
    """Time ``trl.GRPOTrainer`` optimizer steps with a callback (CPU, fp32, no vLLM)."""
    import torch
    import trl
    from transformers import Qwen2_5_VLForConditionalGeneration, TrainerCallback

    from medloc.curriculum import MedLocConfig
    from medloc.models.loading import load_processor

    set_threads(setup.threads)
    model_path, data_dir = prepare_inputs(setup)
    processor = load_processor(model_path, min_pixels=BENCH_PIXELS, max_pixels=BENCH_PIXELS)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        model_path, dtype=torch.float32, attn_implementation="sdpa", local_files_only=True
    )
    curriculum = MedLocConfig()
    factor = int(processor.image_processor.patch_size) * int(processor.image_processor.merge_size)
    reward = make_trl_reward(setup, tau=curriculum.tau0, op=curriculum.op, factor=factor)
    train = trl_dataset(setup, data_dir)

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.cpu_times: list[float] = []
            self.lengths: list[float] = []
            self.tokens: list[float] = []  # cumulative prompt+completion tokens (TRL's num_tokens)
            self.t0 = self.c0 = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.times.append(time.perf_counter() - self.t0)
            self.cpu_times.append(time.process_time() - self.c0)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "completions/mean_length" in logs:
                self.lengths.append(float(logs["completions/mean_length"]))
            if logs and "num_tokens" in logs:
                self.tokens.append(float(logs["num_tokens"]))

    timer = StepTimer()
    with tempfile.TemporaryDirectory(prefix="bench_trl_") as tmp:
        args = trl.GRPOConfig(
            output_dir=tmp,
            per_device_train_batch_size=setup.prompts_per_step * setup.num_generations,  # rows
            gradient_accumulation_steps=1,
            num_generations=setup.num_generations,
            max_completion_length=setup.max_new_tokens,
            temperature=setup.temperature,
            top_p=setup.top_p,
            top_k=0,
            generation_kwargs={"min_new_tokens": setup.max_new_tokens},
            beta=setup.beta,
            loss_type=setup.loss_type,
            epsilon=setup.epsilon,
            num_iterations=1,
            scale_rewards="group",
            learning_rate=setup.lr,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=setup.grad_clip,
            optim="adamw_torch",
            use_vllm=False,
            use_cpu=True,
            bf16=False,
            fp16=False,
            gradient_checkpointing=False,
            max_steps=setup.warmup + setup.steps,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=setup.seed,
            log_completions=False,
        )
        trainer = trl.GRPOTrainer(
            model=model, reward_funcs=[reward], args=args, train_dataset=train,
            processing_class=processor, callbacks=[timer],
        )
        rss_setup = rss_now_mib()
        trainer.train()
    times = timer.times[setup.warmup:]
    cpu_times = timer.cpu_times[setup.warmup:]
    lengths = timer.lengths[setup.warmup:]
    rows = setup.prompts_per_step * setup.num_generations
    per_step_tokens = [b - a for a, b in zip([0.0] + timer.tokens, timer.tokens)][setup.warmup:]
    return {
        "trainer": f"trl {trl.__version__}",
        "times_s": times,
        "cpu_times_s": cpu_times,
        **summarize(times, cpu_times),
        "mean_completion_length": statistics.fmean(lengths) if lengths else float("nan"),
        "mean_tokens_per_row": (statistics.fmean(per_step_tokens) / rows
                                if per_step_tokens else float("nan")),
        "rss_before_first_step_mib": rss_setup,
        "peak_rss_mib": peak_rss_mib(),
        "params": sum(p.numel() for p in model.parameters()),
    }


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
        "MEDLOC_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
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
    a = ap.parse_args(argv)

    if a.side:  # child process: run one side, write its result
        setup = BenchSetup(**json.loads(a.setup_json))
        result = run_medloc(setup) if a.side == "medloc" else run_trl(setup)
        write_json_atomic(Path(a.result_file), result)
        return 0

    if a.warmup < 2 or a.steps < 10 or a.repeats < 1:
        raise SystemExit(f"need --warmup >= 2, --steps >= 10, --repeats >= 1 "
                         f"(got {a.warmup}, {a.steps}, {a.repeats})")
    setup = BenchSetup(
        prompts_per_step=a.prompts_per_step, num_generations=a.num_generations,
        max_new_tokens=a.max_new_tokens, warmup=a.warmup, steps=a.steps, threads=a.threads,
        cache_dir=a.cache_dir,
    )
    t_start = time.perf_counter()
    set_threads(setup.threads)
    prepare_inputs(setup)  # build once here, so neither side times or races the build
    print(f"bench: B={setup.prompts_per_step} prompts x G={setup.num_generations}, "
          f"{setup.max_new_tokens} new tokens forced, beta={setup.beta}, loss={setup.loss_type}, "
          f"T={setup.temperature}, {setup.warmup} warm-up + {setup.steps} measured steps "
          f"x {a.repeats} run(s) per trainer, {setup.threads} thread(s), CPU fp32", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in get_args(Side)}
    for rep in range(a.repeats):
        order = list(get_args(Side)) if rep % 2 == 0 else list(reversed(get_args(Side)))
        for side in order:
            print(f"bench: run {rep + 1}/{a.repeats}: {side} ...", flush=True)
            r = run_side(side, setup)
            print(f"bench:   median {r['median_s']:.3f} s/step, peak RSS {r['peak_rss_mib']:.0f} MiB",
                  flush=True)
            runs[side].append(r)
    results = [pool_runs(runs[side]) for side in get_args(Side)]
    ours, theirs = results
    ratio = theirs["median_s"] / ours["median_s"]
    print(table(results))
    print("same work: generation forced to max_new_tokens on both sides (min_new_tokens = "
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
    print(f"wrote {a.out} ({report['total_wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
