"""Shared fixtures of the integration and distributed tests (CPU only, one thread, no network).

- ``tiny_model_dir`` (session): the embedded tiny Qwen2.5-VL, built once with
  ``medloc.models.tiny.build_tiny_model`` at ``<cache_dir>/models/tiny-1m`` -- the very path the
  ``debug=cpu_tiny`` preset reads, so command-line runs in the tests find it and build nothing.
- ``phantom_dataset`` (session): the small easy phantom dataset of ``debug=cpu_tiny`` (48 images),
  prepared once with ``data_prep.build.ensure_dataset`` under ``<data_root>``.
- ``compose_cfg`` (session): ``compose_cfg([overrides]) -> RunConfig``, the same Hydra composition
  as ``python -m medloc.train debug=cpu_tiny data_root=... cache_dir=... [overrides]``.
- ``warm_start_dir`` (session): an HF folder of the tiny model after a short, high-lr SFT on the
  phantoms. A random tiny model never produces a parseable box, so every reward, advantage and
  policy loss is 0 and GRPO tests would pass vacuously; from this start the rewards vary.
- ``cli`` (session): runs ``python -m medloc.train`` (or ``torchrun``) in a subprocess with a clean
  environment, a timeout and a free rendezvous port; on failure the assertion shows the output.
"""

from __future__ import annotations

import os

# Before torch is imported anywhere: one BLAS thread per process (2 shared cores).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
VENV_BIN = Path(sys.executable).parent

# Variables of an existing process group (an in-process Engine sets them in os.environ). A child
# that inherited MASTER_PORT would try to bind the rendezvous port this process already holds.
_DIST_ENV = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
    "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "CROSS_RANK", "CROSS_SIZE",
)

# SFT warm start: 5e-3 for 60 steps of 8 phantoms puts the tiny model on the answer format with a
# box that overlaps the lesion (mean IoU ~0.45 greedy on the eval split, measured); sampled
# completions at temperature 0.9 then get rewards that differ within a group.
WARM_START_OVERRIDES = ["method=sft", "engine=zero0", "optim.lr=5e-3", "trainer.max_steps=60",
                        "trainer.save_every=0"]


def compose_run_config(overrides: Sequence[str]):
    """Hydra composition of ``conf/config.yaml`` with ``overrides`` -> validated RunConfig."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from medloc.config import register_configs, to_run_config

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    return to_run_config(cfg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    """The environment for launched runs: this one minus process-group variables, one thread."""
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONPATH=str(REPO))
    return env


@pytest.fixture(scope="session")
def world_dirs(tmp_path_factory) -> dict[str, Path]:
    """``data_root`` and ``cache_dir`` shared by every test of the session."""
    root = tmp_path_factory.mktemp("world")
    return {"data_root": root / "data", "cache_dir": root / "cache"}


@pytest.fixture(scope="session")
def base_overrides(world_dirs) -> list[str]:
    """What every test run starts from: the cpu_tiny preset on the session's model and data,
    quiet console, no evaluation after training (tests that want it turn it back on)."""
    return [
        "debug=cpu_tiny",
        f"data_root={world_dirs['data_root']}",
        f"cache_dir={world_dirs['cache_dir']}",
        "logger.progress=false",
        "trainer.eval_after=false",
    ]


@pytest.fixture(scope="session")
def compose_cfg(base_overrides) -> Callable[..., object]:
    def _compose(overrides: Sequence[str] = ()):
        return compose_run_config([*base_overrides, *overrides])

    return _compose


@pytest.fixture(scope="session")
def tiny_model_dir(compose_cfg) -> Path:
    from medloc.models.tiny import build_tiny_model

    cfg = compose_cfg()
    return build_tiny_model(Path(cfg.model.path), size=cfg.model.build_tiny, seed=0)


@pytest.fixture(scope="session")
def tiny_dir(tiny_model_dir) -> Path:
    """The session's tiny-1m model folder (seed 0, default pixel budget)."""
    return tiny_model_dir


@pytest.fixture(scope="module")
def processor(tiny_dir):
    from medloc.models.loading import load_processor

    return load_processor(tiny_dir)


@pytest.fixture(scope="module")
def model(tiny_dir):
    from medloc.models.loading import load_model

    return load_model(tiny_dir, dtype="float32", attn_implementation="sdpa")


@pytest.fixture(scope="session")
def phantom_dataset(compose_cfg):
    """The cpu_tiny DatasetConfig, prepared on disk (train/test JSONL + images)."""
    from data_prep.build import ensure_dataset

    ds = compose_cfg().dataset
    ensure_dataset(ds)
    return ds


@pytest.fixture(scope="session")
def warm_start_dir(compose_cfg, tiny_model_dir, phantom_dataset, tmp_path_factory) -> Path:
    """HF folder of the tiny model after the warm-start SFT (built in-process, ZeRO-0)."""
    from medloc.sft import SFTTrainer

    cfg = compose_cfg(WARM_START_OVERRIDES)
    run_dir = tmp_path_factory.mktemp("warm_start")
    return SFTTrainer(cfg, run_dir, str(tiny_model_dir)).fit()


class CliRunner:
    """Launch ``medloc.train`` (or a worker script) as a child process and report its output."""

    def __init__(self, base: list[str]):
        self.base = base

    def __call__(self, overrides: Sequence[str], *, nproc: int | None = None,
                 script: str | None = None, script_args: Sequence[str] = (),
                 timeout: float = 300, check: bool = True,
                 base: bool = True) -> subprocess.CompletedProcess:
        """``nproc=None``: ``python -m medloc.train``; else ``torchrun --nproc_per_node=nproc``.
        ``script`` replaces ``-m medloc.train`` by a script path (relative to the repository)."""
        target = [str(REPO / script), *script_args] if script else ["-m", "medloc.train"]
        if nproc is None:
            cmd = [sys.executable, *target]
        else:
            cmd = [str(VENV_BIN / "torchrun"), f"--nproc_per_node={nproc}",
                   f"--master_port={free_port()}", "--master_addr=127.0.0.1", *target]
        cmd += [*(self.base if base else []), *overrides]
        try:
            proc = subprocess.run(cmd, check=False, cwd=REPO, env=child_env(),
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as err:
            out = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                          for x in (err.stdout, err.stderr))
            raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n{out[-8000:]}") \
                from err
        if check and proc.returncode != 0:
            raise AssertionError(
                f"exit code {proc.returncode}: {' '.join(cmd)}\n--- stdout ---\n{proc.stdout[-6000:]}"
                f"\n--- stderr ---\n{proc.stderr[-8000:]}"
            )
        return proc


@pytest.fixture(scope="session")
def cli(base_overrides, tiny_model_dir, phantom_dataset) -> CliRunner:
    return CliRunner(base_overrides)


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of ``<run_dir>/metrics.jsonl``."""
    import json

    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def metrics_of() -> Callable[[Path], list[dict]]:
    return read_metrics
