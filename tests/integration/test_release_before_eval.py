"""Evaluation after training starts from released memory (medloc/train.py, medloc/engine.py).

``medloc.train.run`` with ``trainer.eval_after=true``, in-process, one step of GRPO under ZeRO-0
and under ZeRO-3 (one process): when the evaluation loads its model (the run's ``final`` folder),
nothing of the training engine is alive -- weak references to the ``Engine``, the DeepSpeed
engines of the policy and the reference, the Hugging Face policy module and the optimizer are all
dead, and transformers no longer sees a ZeRO-3 config (else ``from_pretrained`` would load the
evaluation model into ZeRO-3 partitions). At 62cf3b8 the trainer was dropped without a garbage
collection: DeepSpeed's engines sit in reference cycles, so all of them were still alive there.
(The other ranks of a multi-process run do not wait for the evaluation: tests/distributed.)
"""

from __future__ import annotations

import weakref
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

RUN = ["trainer.max_steps=1", "trainer.save_every=0", "trainer.eval_after=true",
       "dataset.max_eval_samples=2", "eval.batch_size=2"]


@pytest.mark.parametrize(("engine", "shared_prefix"), [
    ("zero0", True),
    ("zero3", False),
    # The shared-prefix update replays ZeRO-3's complete module trace, which fills DeepSpeed's
    # class-level lru_cache of parameters to release (keyed by module): without Engine.close
    # clearing it, the policy module and its engine stay alive.
    ("zero3", True),
])
def test_nothing_of_the_training_engine_is_alive_when_the_evaluation_model_loads(
        compose_cfg, tiny_model_dir, phantom_dataset, tmp_path, monkeypatch, engine,
        shared_prefix):
    from transformers.integrations import is_deepspeed_zero3_enabled

    from medloc import engine as eng
    from medloc.models import loading
    from medloc.train import run

    run_dir = tmp_path / "run"
    refs: dict[str, weakref.ref] = {}
    engine_init = eng.Engine.__init__

    def recording_init(self, spec):
        engine_init(self, spec)
        parts = {"Engine": self, "policy engine": self.policy, "policy module": self.module,
                 "optimizer": self.optimizer, "reference": self.reference}
        refs.update({name: weakref.ref(obj) for name, obj in parts.items()})

    seen = []
    load_model = loading.load_model

    def checking_load(path, *args, **kwargs):
        if Path(path) == run_dir / "final":  # the evaluation's load (the engine loads the start)
            seen.append(({name: r() is not None for name, r in refs.items()},
                         is_deepspeed_zero3_enabled()))
        return load_model(path, *args, **kwargs)

    monkeypatch.setattr(eng.Engine, "__init__", recording_init)
    monkeypatch.setattr(loading, "load_model", checking_load)
    run(compose_cfg([f"engine={engine}", f"grpo.shared_prefix_update={shared_prefix}", *RUN]),
        run_dir)

    assert (run_dir / "eval" / "metrics.json").is_file()
    assert len(refs) == 5 and len(seen) == 1  # one engine was built, one evaluation load
    alive, zero3 = seen[0]
    assert alive == dict.fromkeys(refs, False), alive
    assert not zero3
