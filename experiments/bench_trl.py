"""The TRL side of ``make bench`` (``experiments.bench_grpo``): ``trl.GRPOTrainer`` on the same model,
data, reward and step shape as medloc's side, its optimizer steps timed with a callback."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from experiments.bench_setup import (
    BENCH_PIXELS,
    BenchSetup,
    peak_rss_mib,
    prepare_inputs,
    rss_now_mib,
    set_threads,
    summarize,
)


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
