"""The settings both sides of ``make bench`` share (``experiments.bench_grpo``): ``BenchSetup``, the
medloc run configuration composed from ``conf/``, the inputs built once, and the measurements
(step-time statistics, resident memory) each side reports."""

from __future__ import annotations

import resource
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONF = Path(__file__).resolve().parents[1] / "conf"

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
    # medloc only: grpo.compile_decode (the decode step through torch.compile; the first warm-up
    # step then includes the compilation, ~1-2.5 min on 2 CPU cores)
    compile_decode: bool = False
    # medloc only: grpo.shared_prefix_update (each prompt once per update forward; false: every
    # row's prompt + completion, the per-row forward before it)
    shared_prefix_update: bool = True

    @property
    def model_dir(self) -> Path:
        return Path(self.cache_dir) / "models" / self.model_size

    @property
    def data_dir(self) -> Path:
        return Path(self.cache_dir) / "bench" / "data" / "phantom_ham10000"

    @property
    def raw_dir(self) -> Path:
        return Path(self.cache_dir) / "bench" / "data" / "raw" / "phantom_ham10000"


def bench_overrides(setup: BenchSetup) -> list[str]:
    """The overrides of ``conf/config.yaml`` that make the bench's run (GRPO, ZeRO-0, fp32, CPU)."""
    rows = setup.prompts_per_step * setup.num_generations
    return [
        f"seed={setup.seed}", f"cache_dir={setup.cache_dir}", f"data_root={setup.data_dir.parent}",
        # data: an easy phantom HAM10000 twin at 112x112 (16 image tokens)
        "dataset=phantom_ham10000", f"dataset.dir={setup.data_dir}",
        f"dataset.raw_dir={setup.raw_dir}", "dataset.query=null",
        f"dataset.min_pixels={BENCH_PIXELS}", f"dataset.max_pixels={BENCH_PIXELS}",
        "dataset.phantom.preset=easy", f"dataset.phantom.n_images={BENCH_PHANTOM_IMAGES}",
        "dataset.phantom.image_size=[112,112]", f"dataset.phantom.seed={setup.seed}",
        "dataset.phantom.size_range=null", "dataset.phantom.contrast=null",
        # model: the tiny Qwen2.5-VL; one forward/backward over all B*G rows, as TRL does here
        "model=tiny_1m", f"model.name={setup.model_size}", f"model.path={setup.model_dir}",
        f"model.build_tiny={setup.model_size}", "model.precision=fp32",
        "model.attn_implementation=sdpa", "model.gradient_checkpointing=false",
        f"model.micro_batch_size={rows}",
        f"reward.answer_format={setup.answer_format}",
        f"grpo.num_generations={setup.num_generations}", f"grpo.temperature={setup.temperature}",
        f"grpo.top_p={setup.top_p}", f"grpo.max_new_tokens={setup.max_new_tokens}",
        f"grpo.beta={setup.beta}", f"grpo.eps_low={setup.epsilon}",
        f"grpo.eps_high={setup.epsilon}", "grpo.mu=1", f"grpo.aggregation={setup.loss_type}",
        f"grpo.compile_decode={str(setup.compile_decode).lower()}",
        f"grpo.shared_prefix_update={str(setup.shared_prefix_update).lower()}",
        f"optim.lr={setup.lr}", "optim.weight_decay=0.0", "optim.warmup_steps=0",
        f"optim.grad_clip={setup.grad_clip}",
        "engine=zero0",
        f"trainer.max_steps={setup.warmup + setup.steps}",
        f"trainer.prompts_per_step={setup.prompts_per_step}", f"trainer.save_every={10**6}",
        "trainer.sample_every=0", "trainer.eval_after=false",
        "logger.progress=false",
    ]


def run_config(setup: BenchSetup) -> Any:
    """The medloc ``RunConfig`` of the bench: ``conf/`` composed with ``bench_overrides``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from medloc.config import register_configs, to_run_config

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return to_run_config(compose(config_name="config", overrides=bench_overrides(setup)))


def prepare_inputs(setup: BenchSetup) -> tuple[str, Path]:
    """Build the tiny model and the phantom data once (outside any timed region)."""
    from data_prep.build import ensure_dataset
    from medloc.prepare import ensure_model

    cfg = run_config(setup)
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
