"""Structured configs: the schema every YAML under ``conf/`` is validated against.

Each group of ``conf/`` has one dataclass here, except ``curriculum``: each threshold schedule has
its own dataclass in its module (``medloc.curriculum.SCHEDULES``), so the group's node is open here
and :func:`medloc.curriculum.schedule_config` turns it into the chosen schedule's dataclass (a key no
schedule has fails). Hydra merges the YAML onto these schemas, so an unknown key or a value of the
wrong type fails at start; ``OmegaConf.to_object`` then builds the dataclasses, whose
``__post_init__`` checks ranges and variant names with a message naming the field.

OmegaConf 2.3 rejects ``Literal`` field types, so variant fields are ``str`` checked against the
``Literal`` aliases below. Values the paper gives are the defaults; values it does not give are
marked ASSUMED (see docs/method.md and docs/deviations.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from hydra.core.config_store import ConfigStore

from medloc.cli_errors import ConfigError, unknown_name_message
from medloc.curriculum import SCHEDULES, ScheduleConfig, schedule_config
from medloc.parsing import ParseRule
from medloc.rewards import RewardKind

Method = Literal["grpo", "sft", "zero_shot"]
AnswerFormat = Literal["vlm_r1_json", "bare_list"]
DatasetKind = Literal["ham10000", "tn3k", "heel"]  # the raw layouts data_prep converts
Aggregation = Literal["grpo", "bnpo", "dr_grpo"]
AdvStd = Literal["unbiased", "population"]
KVCache = Literal["static", "dynamic"]
Precision = Literal["fp32", "bf16"]
AttnImpl = Literal["auto", "sdpa", "eager", "flash_attention_2"]
LoggerBackend = Literal["jsonl", "wandb"]
WandbMode = Literal["offline", "online", "disabled"]
MaskRule = Literal["union", "largest"]
PeftKind = Literal["none", "lora"]


def check_choice(name: str, value: object, alias: object) -> None:
    allowed = get_args(alias)
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {allowed}")


def check_range(name: str, value: float, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not lo <= value <= hi:
        raise ValueError(f"{name}={value!r} must be a number in [{lo}, {hi}]")


def check_positive_int(name: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")


@dataclass
class PhantomConfig:
    """How to generate a synthetic dataset in a real dataset's on-disk layout (data_prep.phantoms)."""

    preset: str = "hard"  # "easy" (large, high-contrast) or "hard" (small, faint) targets
    n_images: int = 300
    image_size: list[int] = field(default_factory=lambda: [112, 112])  # [width, height]
    seed: int = 0
    # Overrides of the preset's difficulty (data_prep.phantoms.PRESETS); null keeps the preset's.
    size_range: list[float] | None = None  # target side as a fraction of the image side [lo, hi]
    contrast: float | None = None
    noise: float | None = None


@dataclass
class DatasetConfig:
    """A grounding dataset in the unified JSONL format (docs/method.md §7), prepared under ``dir``."""

    name: str = "phantom_ham10000"
    # The raw layout data_prep converts from (ham10000, tn3k, heel; phantom twins are generated in
    # it). null for a dataset already in the unified JSONL: it needs no converter, only `dir`.
    kind: str | None = None
    dir: str = "cache/data/phantom_ham10000"  # folder holding {split}.jsonl (data_prep output)
    raw_dir: str | None = None  # the raw dataset folder data_prep converts from
    train_split: str = "train"
    eval_split: str = "test"
    # The finding named in the question (docs/method.md §1); replaces each record's own query when set
    # (null keeps the queries the converter wrote, e.g. for a mixture of datasets).
    query: str | None = None
    # Pixel budget of the Qwen2.5-VL image processor for this dataset.
    min_pixels: int = 3136
    max_pixels: int = 12845056
    mask_rule: str = "union"  # mask -> box when only masks exist (docs/method.md §7)
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    phantom: PhantomConfig | None = None  # set for phantom twins: generated on demand
    # Phantom only: a mixture of several kinds (e.g. the embedded stand-in pretraining data holds
    # easy phantoms of all three modalities); `kind` is then only the label of the mixture.
    mix: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind is not None:
            check_choice("dataset.kind", self.kind, DatasetKind)
        if self.phantom is not None and self.kind is None and not self.mix:
            raise ValueError("dataset.phantom needs dataset.kind: the raw layout to generate")
        for k in self.mix:
            check_choice("dataset.mix[]", k, DatasetKind)
        if self.mix and self.phantom is None:
            raise ValueError("dataset.mix is only supported for phantom datasets (dataset.phantom)")
        check_choice("dataset.mask_rule", self.mask_rule, MaskRule)
        check_positive_int("dataset.min_pixels", self.min_pixels)
        if self.max_pixels < self.min_pixels:
            raise ValueError(
                f"dataset.max_pixels={self.max_pixels} must be >= dataset.min_pixels={self.min_pixels}"
            )


@dataclass
class ModelConfig:
    """A Qwen2.5-VL checkpoint in a LOCAL Hugging Face folder (nothing is downloaded at run time)."""

    name: str = "tiny-1m"
    path: str = "cache/models/tiny-1m"
    # Build the embedded tiny model of this size into `path` when the folder does not exist
    # (null for real weights: a missing folder is then an error that says how to get them).
    build_tiny: str | None = "tiny-1m"
    precision: str = "fp32"
    attn_implementation: str = "auto"  # auto = flash_attention_2 when installed on GPU, else sdpa
    gradient_checkpointing: bool = False
    freeze_vision: bool = False
    micro_batch_size: int = 8  # sequences per forward/backward in the update

    def __post_init__(self) -> None:
        check_choice("model.precision", self.precision, Precision)
        check_choice("model.attn_implementation", self.attn_implementation, AttnImpl)
        check_positive_int("model.micro_batch_size", self.micro_batch_size)


@dataclass
class RewardConfig:
    """Total reward = accuracy_weight * accuracy reward + format_weight * format reward."""

    # The accuracy reward (medloc/rewards.py): "binary" 1[IoU op τ] (MedLoc-R1, VLM-R1, fixed
    # presets), "gated_iou" IoU·1[IoU op τ] (V-Triune, τ = its ε), "raw_iou" IoU (Raw-IoU; needs
    # curriculum=none), "hybrid" and "band" (threshold + continuous, docs/beyond.md). τ and op
    # come from the threshold schedule (`curriculum`).
    kind: str = "binary"
    answer_format: str = "vlm_r1_json"
    # How the box is read from a completion (medloc/parsing.py; docs/deviations.md item 7), in training and
    # evaluation alike: "vlm_r1" = the first [x1, y1, x2, y2] in <answer>…</answer>, whatever
    # surrounds it, as VLM-R1's IoU reward; "strict" = the body must be exactly one JSON box.
    parse_rule: str = "vlm_r1"
    accuracy_weight: float = 1.0
    format_weight: float = 1.0  # ASSUMED (docs/method.md §3): 1.0 as in VLM-R1
    # kind=hybrid: 1[IoU op τ] + λ·IoU (docs/beyond.md). ASSUMED λ = 0.5: a hit (1) outweighs the
    # whole IoU term (at most 0.5), so crossing τ stays what the curriculum rewards; the IoU term
    # still orders the samples of a group that all miss τ, which binary leaves without gradient.
    hybrid_lambda: float = 0.5
    # kind=band: 0 at or below max(τ − w, 0), 1 at τ, linear between (docs/beyond.md). ASSUMED
    # w = 0.2: wider than any single step of the paper's ladder (0.15 / 0.10 / 0.05), so after a
    # raise a sample at the previous τ keeps part of its reward instead of dropping to 0.
    band_width: float = 0.2

    def __post_init__(self) -> None:
        check_choice("reward.kind", self.kind, RewardKind)
        check_range("reward.hybrid_lambda", self.hybrid_lambda, 0.0, 100.0)
        check_range("reward.band_width", self.band_width, 1e-6, 1.0)
        check_choice("reward.answer_format", self.answer_format, AnswerFormat)
        check_choice("reward.parse_rule", self.parse_rule, ParseRule)


@dataclass
class GRPOConfig:
    """GRPO hyper-parameters (docs/method.md §2)."""

    num_generations: int = 8  # G
    temperature: float = 0.9
    top_p: float = 1.0
    max_new_tokens: int = 256
    beta: float = 0.4  # KL weight as the paper states; VLM-R1 / older TRL use 0.04
    eps_low: float = 0.2
    eps_high: float = 0.2
    mu: int = 1  # policy updates per rollout
    aggregation: str = "grpo"
    adv_eps: float = 1e-4
    adv_std: str = "unbiased"
    # Generation (medloc/generation.py): "static" pre-allocates the KV cache of prompt +
    # max_new_tokens slots; "dynamic" grows it per token (same samples, for checking).
    kv_cache: str = "static"
    # Compile the one-token decode step (torch.compile, CUDA graphs on a GPU); needs kv_cache=static.
    compile_decode: bool = False
    # The update's forwards (policy, reference, old policy) run each prompt through the language
    # model once per micro-batch and its completions over that prompt's keys/values
    # (models.logprobs.shared_prefix_logprobs; equal to the per-row forward up to float rounding).
    # false: every row's prompt + completion in one forward (the arithmetic of runs before it).
    shared_prefix_update: bool = True
    # Skip the optimizer step when every group of the step is dead (no policy gradient). Off for the
    # paper; with beta > 0 and Adam the weights otherwise keep drifting on dead steps.
    skip_dead_steps: bool = False

    def __post_init__(self) -> None:
        check_positive_int("grpo.num_generations", self.num_generations, 2)
        check_range("grpo.temperature", self.temperature, 1e-6, 10.0)
        check_range("grpo.top_p", self.top_p, 1e-6, 1.0)
        check_positive_int("grpo.max_new_tokens", self.max_new_tokens)
        check_range("grpo.beta", self.beta, 0.0, 100.0)
        check_range("grpo.eps_low", self.eps_low, 0.0, 1.0)
        check_range("grpo.eps_high", self.eps_high, 0.0, 10.0)
        check_positive_int("grpo.mu", self.mu)
        check_choice("grpo.aggregation", self.aggregation, Aggregation)
        check_choice("grpo.adv_std", self.adv_std, AdvStd)
        check_choice("grpo.kv_cache", self.kv_cache, KVCache)
        if self.compile_decode and self.kv_cache != "static":
            raise ValueError("grpo.compile_decode=true needs grpo.kv_cache=static (fixed shapes)")


@dataclass
class OptimConfig:
    """AdamW (docs/method.md §2: lr 1e-6)."""

    lr: float = 1e-6
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        check_range("optim.lr", self.lr, 0.0, 1.0)
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas={list(self.betas)} must be two numbers in [0, 1)")


@dataclass
class EngineConfig:
    """DeepSpeed (docs/method.md §2: ZeRO-3 on 4 GPUs)."""

    # 0, 1, 2, 3, or "auto": the cheapest stage (and offload) whose model states fit the GPUs of
    # this run, decided and logged at start (medloc/engine_plan.py; conf/engine/auto.yaml).
    # Typed Any because OmegaConf 2.3 has no int-or-str field; __post_init__ checks the value.
    zero_stage: Any = 3
    offload_optimizer: bool = False  # set by the rule under "auto"; by hand with a named stage
    offload_params: bool = False
    # The memory plan (medloc/engine_plan.py, docs/memory_plans.md): "auto" takes the cheapest
    # stage whose per-GPU peak (model states, generation gather, activations, KV cache, logits:
    # computed from this config) + auto_reserve_gib fits the GPU, and whose host bytes (offloaded
    # state, model load) + auto_host_reserve_gib_per_rank per process fit the host's RAM. A named
    # stage is used as it is; its plan is printed all the same.
    # ASSUMED: per GPU, what the plan does not compute: the CUDA context and library workspaces
    # (~1 GiB), DeepSpeed's communication buckets (reduce / all-gather buckets of 5e8 elements,
    # ~0.9 GiB each in bf16; ZeRO-3's live parameters beyond the largest layer) and the caching
    # allocator's fragmentation (a few percent of the peak).
    auto_reserve_gib: float = 6.0
    # ASSUMED: host RAM per process besides the model: its Python with torch, CUDA and DeepSpeed
    # loaded (~3 GiB resident), the decoded images of a step, a share of the OS.
    auto_host_reserve_gib_per_rank: float = 4.0
    # ASSUMED: text tokens of a prompt besides the image tokens: the chat template with its default
    # system message, vision start/end, the question with its finding and the answer-format
    # instruction (about 60-100 by word count for the VLM-R1 prompt); 128 leaves room.
    auto_prompt_text_tokens: int = 128
    # Replaced by auto_reserve_gib (activations, KV cache and logits are computed now); a config
    # that still sets it fails at start and says so.
    auto_headroom_gib: float | None = None

    def __post_init__(self) -> None:
        stage = self.zero_stage
        if stage != "auto" and (isinstance(stage, bool) or stage not in (0, 1, 2, 3)):
            raise ValueError(f"engine.zero_stage={stage!r} must be 0, 1, 2, 3 or auto")
        if stage == "auto" and (self.offload_optimizer or self.offload_params):
            raise ValueError(
                "engine.zero_stage=auto decides the offload itself; to set engine.offload_* by "
                "hand name a stage (e.g. engine=zero3_offload)"
            )
        if self.auto_headroom_gib is not None:
            raise ValueError(
                f"engine.auto_headroom_gib={self.auto_headroom_gib} is no longer used: the memory "
                "plan computes activations, KV cache and logits from the config "
                "(medloc/engine_plan.py, docs/memory_plans.md). Remove it; what stays fixed "
                "(CUDA context, DeepSpeed buckets, fragmentation) is engine.auto_reserve_gib"
            )
        check_range("engine.auto_reserve_gib", self.auto_reserve_gib, 0.0, 1e6)
        check_range("engine.auto_host_reserve_gib_per_rank", self.auto_host_reserve_gib_per_rank,
                    0.0, 1e6)
        check_positive_int("engine.auto_prompt_text_tokens", self.auto_prompt_text_tokens, 0)


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning (conf/peft/; medloc/models/lora.py; docs/lora.md).

    ``kind=none`` (default) trains every parameter, as the paper does. ``kind=lora`` trains LoRA
    adapters through the ``peft`` library on a frozen base; the GRPO reference is then the policy
    with its adapters switched off (no second model). The values below are used with kind=lora.
    """

    kind: str = "none"
    # ASSUMED (docs/method.md is silent; the paper trains every parameter): rank 64 and alpha 128,
    # the values of VLM-R1's LoRA script for Qwen2.5-VL (EasyR1's example uses rank 64 too).
    r: int = 64
    alpha: float = 128.0
    # 0: GRPO's update must compute the log-probs of the distribution it sampled from (eval mode),
    # which a dropout in train mode would not; SFT may set it.
    dropout: float = 0.0
    # Short names of the language model's linear layers to adapt (attention and MLP projections,
    # as EasyR1, verl and VLM-R1); the vision tower and merger are left out unless include_vision.
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    include_vision: bool = False  # adapt every linear layer of the vision tower and merger too
    # The learning rate with kind=lora (null: optim.lr). LoRA takes a larger step than full
    # fine-tuning; the paper preset sets VLM-R1's LoRA value (conf/preset/paper.yaml).
    lr: float | None = None

    def __post_init__(self) -> None:
        check_choice("peft.kind", self.kind, PeftKind)
        check_positive_int("peft.r", self.r)
        check_range("peft.alpha", self.alpha, 1e-9, 1e9)
        check_range("peft.dropout", self.dropout, 0.0, 0.99)
        if not self.target_modules and not self.include_vision:
            raise ValueError("peft.target_modules=[] with peft.include_vision=false adapts nothing")
        if self.lr is not None:
            check_range("peft.lr", self.lr, 0.0, 1.0)


@dataclass
class TrainerConfig:
    """The loop: steps, batch, checkpoints, logging."""

    max_steps: int = 500
    prompts_per_step: int = 8  # B, prompts per optimizer step over all ranks (G samples each)
    sft_batch_size: int = 32  # SFT examples per optimizer step over all ranks
    save_every: int = 100  # checkpoint every K steps and at the end; 0 = only the final policy
    keep_last: int = 2
    resume: bool = False
    log_every: int = 1
    sample_every: int = 50  # write sample completions every K steps
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    eval_after: bool = True  # evaluate the final policy on dataset.eval_split

    def __post_init__(self) -> None:
        check_positive_int("trainer.max_steps", self.max_steps, 0)
        check_positive_int("trainer.prompts_per_step", self.prompts_per_step)
        check_positive_int("trainer.save_every", self.save_every, 0)
        check_positive_int("trainer.keep_last", self.keep_last)


@dataclass
class LoggerConfig:
    backend: str = "jsonl"  # metrics.jsonl is always written; "wandb" adds wandb
    wandb_mode: str = "offline"  # offline by default: never needs the network
    project: str = "medloc"
    progress: bool = True

    def __post_init__(self) -> None:
        check_choice("logger.backend", self.backend, LoggerBackend)
        check_choice("logger.wandb_mode", self.wandb_mode, WandbMode)


@dataclass
class EvalConfig:
    batch_size: int = 16
    max_new_tokens: int = 256
    checkpoint: str | None = None  # HF folder to evaluate; default: the run's final policy


@dataclass
class RunConfig:
    """The root config of ``python -m medloc.train`` and ``python -m eval.evaluate``."""

    method: str = "grpo"
    # The results-table row this run fills: conf/arm/<arm>.yaml sets it (its own file name), and
    # run_info.json records it for eval.table / eval.plots. Empty for a run composed by hand.
    arm: str = ""
    seed: int = 0
    experiment: str = ""  # name of the experiment (paper table) this run belongs to
    data_root: str = "cache/data"
    cache_dir: str = "cache"
    init_from: str | None = None  # start from this HF checkpoint instead of model.path
    force: bool = False  # delete the run folder's results and rerun (runtime.plan_run_folder)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    # The threshold schedule: a mapping in the Hydra schema (each schedule has its own keys), the
    # chosen schedule's dataclass (medloc.curriculum.SCHEDULES) once validated.
    curriculum: Any = field(default_factory=lambda: {"schedule": "medloc"})
    reward: RewardConfig = field(default_factory=RewardConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        check_choice("method", self.method, Method)
        self.curriculum = schedule_config(self.curriculum)
        if self.method == "grpo":
            check_reward_and_schedule(self.reward.kind, self.curriculum)
        check_peft(self.method, self.peft, self.model)


def check_peft(method: str, peft: PeftConfig, model: ModelConfig) -> None:
    """LoRA settings that cannot work with the rest of the run: fail at start."""
    if peft.kind != "lora":
        return
    if method == "grpo" and peft.dropout > 0:
        raise ValueError(
            f"peft.dropout={peft.dropout} with method=grpo: the update's log-probs must be those of "
            "the distribution the completions were sampled from (dropout off); use peft.dropout=0")
    if peft.include_vision and model.freeze_vision:
        raise ValueError("peft.include_vision=true adapts the vision tower, model.freeze_vision=true "
                         "freezes it: choose one")


def check_reward_and_schedule(kind: str, schedule: ScheduleConfig) -> None:
    """``reward.kind=raw_iou`` reads no threshold and the others need one: fail at start."""
    if kind == "raw_iou" and schedule.has_threshold:
        raise ValueError(
            f"reward.kind=raw_iou reads no threshold, but curriculum.schedule={schedule.schedule!r} "
            f"makes one; use curriculum=none (conf/arm/raw_iou.yaml)"
        )
    if kind != "raw_iou" and not schedule.has_threshold:
        raise ValueError(
            f"reward.kind={kind} needs a threshold, but curriculum.schedule={schedule.schedule!r} "
            f"makes none; pick a schedule with one ({', '.join(k for k, c in SCHEDULES.items() if c.has_threshold)})"
        )


def run_label(cfg: RunConfig) -> str:
    """Short name of a run for progress lines: dataset/arm/s<seed> (the method if no arm)."""
    return "/".join((cfg.dataset.name, cfg.arm or cfg.method, f"s{cfg.seed}"))


def register_configs() -> None:
    """Register the schemas so each ``conf/`` YAML is checked against its dataclass."""
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    for group, node in [
        ("dataset", DatasetConfig),
        ("model", ModelConfig),
        ("reward", RewardConfig),
        ("grpo", GRPOConfig),
        ("optim", OptimConfig),
        ("engine", EngineConfig),
        ("peft", PeftConfig),
        ("trainer", TrainerConfig),
        ("logger", LoggerConfig),
    ]:
        cs.store(group=group, name=f"{group}_schema", node=node)


def _check_known_keys(node: Any, schema: type, where: str) -> None:
    """Reject keys the schema does not have. Hydra lets ``+key=value`` add keys to a structured
    node, and ``OmegaConf.to_object`` then drops them silently: a typo would be ignored."""
    import dataclasses
    import typing

    from omegaconf import DictConfig

    hints = typing.get_type_hints(schema)
    for key in node:
        if key not in hints:

            what = f"'{where[:-1]}'" if where else "the top-level config"
            raise ConfigError(f"{where}{key}: " + unknown_name_message(what, str(key), hints))
        value = node._get_node(key)
        if not isinstance(value, DictConfig) or value._is_none():
            continue
        kinds = [t for t in (typing.get_args(hints[key]) or (hints[key],)) if t is not type(None)]
        for kind in kinds:
            if dataclasses.is_dataclass(kind):
                _check_known_keys(value, kind, f"{where}{key}.")


def to_run_config(cfg: Any) -> RunConfig:
    """DictConfig (already merged onto the schema) -> validated RunConfig dataclasses."""
    from omegaconf import OmegaConf

    _check_known_keys(cfg, RunConfig, "")
    try:
        obj = OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except ValueError as err:  # a dataclass check (__post_init__): field, value and what is expected
        raise ConfigError(str(err)) from err
    if not isinstance(obj, RunConfig):
        raise TypeError(f"expected a RunConfig, got {type(obj).__name__}")
    return obj
