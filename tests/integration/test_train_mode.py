"""The policy trains in train mode (so gradient checkpointing is really on), samples in eval mode, and
the reference is always in eval mode (medloc/engine.py); train mode changes no numbers (dropout off,
medloc.models.loading.disable_dropout). Tiny Qwen2.5-VL, CPU, ZeRO-0, through the Engine.

How checkpointing is seen: transformers checkpoints a decoder layer's ``forward`` (not its
``__call__``) when ``gradient_checkpointing and self.training``, so the backward pass runs the
layer's forward a second time to recompute its activations, and the modules inside it (its MLP)
are entered again. A forward PRE-hook on every MLP therefore counts 2 calls per layer per
forward + backward with checkpointing active and 1 without it, whatever transformers' internals.
(A post-hook would not see the recompute: torch stops it early, inside the MLP, once the last
tensor the backward needs is recomputed.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from medloc.data.collate import encode_prompts, model_inputs
from medloc.data.prompts import build_messages
from medloc.engine import Engine, EngineSpec
from medloc.models.loading import disable_dropout, load_model, vision_tower

torch.set_num_threads(1)


def _engine(tiny_dir, *, checkpointing: bool) -> Engine:
    return Engine(EngineSpec(model_path=str(tiny_dir), zero_stage=0, precision="fp32",
                             attn_implementation="sdpa", gradient_checkpointing=checkpointing,
                             micro_batch_size=2, grad_accum_steps=1, lr=1e-3, with_reference=True))


def _inputs(processor) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))
              for _ in range(2)]
    messages = [build_messages("the skin lesion", images[0], "bare_list"),
                build_messages("the thyroid nodule", images[1], "bare_list")]
    return model_inputs(encode_prompts(processor, images, messages))


def _mlps(model: torch.nn.Module) -> dict[str, list[torch.nn.Module]]:
    """The MLP of every text decoder layer and of every vision block."""
    text = [layer.mlp for layer in model.model.language_model.layers]
    vision = [block.mlp for block in vision_tower(model).blocks]
    assert text and vision
    return {"text": text, "vision": vision}


def _mlp_calls_in_one_update(engine: Engine, inputs: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """Forward + backward + step through the DeepSpeed engine, as the trainers do; MLP calls."""
    counts = {kind: [0] * len(mods) for kind, mods in _mlps(engine.module).items()}
    handles = []
    for kind, mods in _mlps(engine.module).items():
        for i, mod in enumerate(mods):
            def hook(*_args, kind=kind, i=i):
                counts[kind][i] += 1
            handles.append(mod.register_forward_pre_hook(hook))
    try:
        logits = engine.policy(**inputs, use_cache=False).logits  # [B, P, V]
        engine.backward(logits.float().pow(2).mean())
        engine.micro_step()
    finally:
        for h in handles:
            h.remove()
    return counts


def _no_module_training(model: torch.nn.Module) -> bool:
    return not any(m.training for m in model.modules())


def test_checkpointing_requested_is_active_in_the_update(tiny_dir, processor):
    engine = _engine(tiny_dir, checkpointing=True)
    inputs = _inputs(processor)
    assert engine.module.training  # the update runs in train mode
    assert engine.reference is not None and _no_module_training(engine.reference)
    counts = _mlp_calls_in_one_update(engine, inputs)
    # Each checkpointed layer runs twice: the forward, and the recompute in the backward.
    assert counts == {kind: [2] * len(c) for kind, c in counts.items()}, counts
    # Sampling runs in eval mode (nothing checkpointed, KV cache allowed), then train mode again.
    with engine.generation_context() as model:
        assert _no_module_training(model)
    assert all(m.training for m in engine.module.modules())
    assert _no_module_training(engine.reference)  # the reference never leaves eval mode


def test_without_checkpointing_each_layer_runs_once(tiny_dir, processor):
    """The control of the test above: the count tells checkpointing on from off."""
    engine = _engine(tiny_dir, checkpointing=False)
    assert engine.module.training
    counts = _mlp_calls_in_one_update(engine, _inputs(processor))
    assert counts == {kind: [1] * len(c) for kind, c in counts.items()}, counts


def test_train_mode_computes_what_eval_mode_computes(tiny_dir, processor):
    """The update's log-probs (train mode, checkpointing on) are those of sampling (eval mode)."""
    engine = _engine(tiny_dir, checkpointing=True)
    inputs = _inputs(processor)
    module = engine.module
    assert module.training
    with torch.no_grad():
        train_logits = engine.policy(**inputs, use_cache=False).logits
        module.eval()
        eval_logits = engine.policy(**inputs, use_cache=False).logits
        module.train()
    assert torch.equal(train_logits, eval_logits)


def test_disable_dropout_makes_train_mode_deterministic(tiny_dir, processor):
    """A config with attention dropout > 0 (none that we ship): dropout acts in train mode until
    disable_dropout switches it off; the released configs have none to switch off."""
    model = load_model(tiny_dir, dtype="float32", attn_implementation="eager")
    attention = [m for m in model.modules() if hasattr(m, "attention_dropout")]
    assert attention and all(m.attention_dropout == 0.0 for m in attention)
    assert model.config.text_config.attention_dropout == 0.0
    for m in model.model.language_model.modules():
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.5
    inputs = _inputs(processor)
    with torch.no_grad():
        reference = model.eval()(**inputs).logits
        torch.manual_seed(0)
        noisy = model.train()(**inputs).logits
        assert not torch.allclose(noisy, reference)  # dropout acts
        n_text_layers = len(model.model.language_model.layers)
        assert disable_dropout(model) == n_text_layers
        assert torch.equal(model.train()(**inputs).logits, reference)
    assert disable_dropout(model) == 0


@pytest.mark.parametrize("shape", ["qwen2.5-vl-3b", "qwen2.5-vl-7b"])
def test_real_shapes_have_no_dropout(shape):
    from medloc.models import shapes, tiny

    tokenizer = tiny.train_tiny_tokenizer(tiny.tiny_arch("tiny-1m").bpe_vocab_size)
    config = shapes.shape_config(shapes.SHAPES[shape], tokenizer)
    assert config.text_config.attention_dropout == 0.0
