"""Structured config schemas, validated at start-up.

Hydra composes `configs/` on top of these dataclasses, so an unknown key or a wrong type fails while the command
line is parsed; `validate()` then checks what types cannot express (divisibility, lengths, exclusive keys) and raises
`ConfigError` with one line naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from nopetrain.exits import REFUSED, ExitError


class ConfigError(ExitError, ValueError):
    """A config value that cannot work; the message names the key."""


QK_NORM_CHOICES = ("none", "qk", "q")


@dataclass
class ModelConfig:
    # The preset's name (configs/model/), also the default run.name.
    name: str = "tiny"
    # Rows of the embedding and the LM head; at least the tokenizer's vocabulary.
    vocab_size: int = 512
    # Width of the residual stream.
    hidden_size: int = 128
    # Width of the SwiGLU MLP's hidden layer.
    intermediate_size: int = 344
    # Transformer blocks.
    num_layers: int = 4
    # Query heads; num_kv_heads key/value heads shared by groups of them (GQA), equal for multi-head attention.
    num_heads: int = 4
    # Key/value heads; num_heads must be a multiple of it.
    num_kv_heads: int = 2
    # Defaults to hidden_size // num_heads; set it for models whose heads are wider or narrower.
    head_dim: int | None = None
    # The LM head shares the embedding's weight.
    tie_embeddings: bool = True
    # Biases on the q, k and v projections (Qwen2); every other projection is bias-free.
    qkv_bias: bool = False
    # RoPE's base: frequencies theta^(-2m/head_dim).
    rope_theta: float = 10000.0
    # Hugging Face SmolLM3 convention: layer i is NoPE iff (i + 1) % interval == 0; 0 means RoPE everywhere.
    no_rope_layer_interval: int | None = None
    # Explicit per-layer list, 1 = RoPE, 0 = NoPE. Exclusive with no_rope_layer_interval.
    no_rope_layers: list[int] | None = None
    # Per-head RMS norm of queries and keys before RoPE: none, qk, or q (query only). A DroPE switch sets it.
    qk_norm: str = "none"
    # Sliding-window attention on the RoPE layers only (NoPE layers stay global): RNoPE-SWA is a config.
    sliding_window: int | None = None
    # Multiplies the softmax logits at every length.
    attn_logit_scale: float = 1.0
    # DroPE's length scaling on top of it: beta = 1 + c ln(s), s = max(1, input length / train_context). c is fitted
    # on held-out perplexity by `nopetrain-eval`; 0 leaves the logits alone at every length.
    logit_scale_coef: float = 0.0
    # The context the logit scale's s is measured against (the fit sets it with c).
    train_context: int | None = None
    # RMSNorm's epsilon.
    norm_eps: float = 1e-5
    # Standard deviation of the normal initialisation of every weight matrix.
    init_std: float = 0.02

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    def logit_scale_at(self, seq_len: int) -> float:
        """The softmax logit multiplier for an input of `seq_len` tokens."""
        if self.logit_scale_coef == 0.0 or self.train_context is None:
            return self.attn_logit_scale
        return self.attn_logit_scale * (1.0 + self.logit_scale_coef * math.log(max(1.0, seq_len / self.train_context)))

    def rope_layers(self) -> list[bool]:
        """Whether each layer applies RoPE, from whichever cadence key is set."""
        if self.no_rope_layers is not None:
            return [bool(flag) for flag in self.no_rope_layers]
        interval = self.no_rope_layer_interval or 0
        if interval == 0:
            return [True] * self.num_layers
        return [(i + 1) % interval != 0 for i in range(self.num_layers)]


@dataclass
class DeepSpeedConfig:
    # The preset's name (configs/deepspeed/).
    name: str = "zero1"
    # ZeRO stage: 1 partitions optimizer state, 2 also gradients, 3 also parameters.
    stage: int = 1
    # Optimizer state and step on the CPU (DeepSpeed's CPU Adam).
    offload_optimizer: bool = False
    # ZeRO-3 parameters on the CPU between uses.
    offload_params: bool = False
    # Merged last into the generated DeepSpeed JSON, for settings this schema does not name.
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SourceConfig:
    # A directory (or URL) holding a manifest.json written by `nopetrain-data tokenize`, or a brace
    # pattern / list of webdataset .tar URLs (e.g. "s3://bucket/web-{000000..000099}.tar" via webdataset's gopen).
    path: str = "???"
    # Relative sampling weight within its group (and overall when no curriculum phase names weights).
    weight: float = 1.0
    # Curriculum phases weight groups (web, code, math, ...); a source's group defaults to its own name.
    group: str | None = None


@dataclass
class DataConfig:
    # The preset's name (configs/data/).
    name: str = "synthetic"
    # shards: webdataset token shards mixed by weight; synthetic: a built-in generator, no files needed.
    kind: str = "synthetic"
    # The corpus folder the shipped data configs' source paths start with (`${data.root}/train/web`), so a corpus
    # built elsewhere is one override: data.root=/scratch/corpus.
    root: str = ""
    # The data sources by name; curriculum phases weight them by group.
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    # DataLoader worker processes per source and rank; 0 reads in the training process.
    num_workers: int = 1
    # Positions restart at each document and attention does not cross documents.
    document_masking: bool = True
    # raise: a bad shard stops the run naming shard and sample; skip: the shard is skipped, counted and logged.
    on_error: str = "raise"
    # Synthetic source: tokens follow a fixed sparse bigram table, so the loss has somewhere to go.
    successors_per_token: int = 4


@dataclass
class OptimConfig:
    # AdamW's peak learning rate (the schedule scales it).
    lr: float = 1e-3
    # AdamW's (beta1, beta2).
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    # AdamW's epsilon.
    eps: float = 1e-8
    # Decoupled weight decay on the weight matrices; never on norms and biases.
    weight_decay: float = 0.1
    # SmolLM3 keeps weight decay off the embeddings as well as off norms and biases.
    decay_embeddings: bool = False
    # Gradient norm clipped to this over all parameters; 0 for none.
    grad_clip: float = 1.0


@dataclass
class ScheduleConfig:
    # cosine: warmup then cosine to min_lr_ratio; wsd: warmup, constant, linear decay over the last decay_fraction.
    name: str = "cosine"
    # Linear warmup from 0 to optim.lr.
    warmup_steps: int = 10
    # The final LR as a fraction of optim.lr.
    min_lr_ratio: float = 0.1
    # wsd: the decay's share of the run, unless curriculum.decay_phase says where it starts.
    decay_fraction: float = 0.1


@dataclass
class PhaseConfig:
    # Logged at the phase change, in metrics.jsonl, W&B and the checkpoint.
    name: str = "???"
    # Length: at most one of steps, tokens, fraction (of `steps`); a phase with none runs to the end of the run.
    steps: int | None = None
    # The phase's length in tokens, rounded to whole steps.
    tokens: int | None = None
    # The phase's length as a fraction of the run's `steps`.
    fraction: float | None = None
    # Mixture weights by source group (or source name); groups not named get weight 0. Empty: data.sources weights.
    weights: dict[str, float] = field(default_factory=dict)
    # Optional per-phase sequence length and batch size (sequences per optimizer step).
    seq_len: int | None = None
    # The phase's sequences per optimizer step; null: the run's global_batch_size.
    global_batch_size: int | None = None


@dataclass
class DropeConfig:
    # When RoPE is dropped from every layer: at most one of at_step, at_fraction (of `steps`), at_phase (its start).
    at_step: int | None = None
    # The drop as a fraction of the run's steps.
    at_fraction: float | None = None
    # The drop at the start of the phase of this name.
    at_phase: str | None = None
    # QK-norm added at the drop (unit gains): none, qk, or q (query only).
    qk_norm: str = "none"
    # Recalibration schedule from the drop to the end of the run; lr null keeps the main schedule going.
    lr: float | None = None
    # Linear warmup of the recalibration LR, in steps from the drop.
    warmup_steps: int = 0
    # Or the warmup as a fraction of the recalibration steps (the paper: 70 of 2K steps, 490 of ~30K).
    warmup_fraction: float | None = None
    # cosine or constant after the warmup.
    schedule: str = "cosine"
    # The recalibration's final LR as a fraction of its lr.
    min_lr_ratio: float = 0.0
    # Zero AdamW's moments and step at the drop (needed when the run starts from a checkpoint taken before it).
    reset_optimizer: bool = False


@dataclass
class CurriculumConfig:
    # The preset's name (configs/curriculum/).
    name: str = "single"
    # The run's phases in order; empty: one phase, the whole run.
    phases: list[PhaseConfig] = field(default_factory=list)
    # Warmup-stable-decay: the decay starts at this phase (SmolLM3's decay stage starts the annealing phase).
    decay_phase: str | None = None
    # The DroPE switch and its recalibration.
    drope: DropeConfig = field(default_factory=DropeConfig)


@dataclass
class CheckpointConfig:
    # A checkpoint every this many steps (and at the end, at stop_at_step and on a preemption signal).
    every: int = 100
    # Complete checkpoints kept; older ones are pruned after each save.
    keep: int = 2
    # Also saved at these steps and never pruned: the steps other runs start from (a DroPE run recalibrating this
    # run's weights from the drop step on, `checkpoint.resume=.../step_N`).
    keep_steps: list[int] = field(default_factory=list)
    # auto: continue from the newest complete checkpoint of run.dir if there is one; none: start fresh (refused
    # if run.dir already has checkpoints); or a path to a checkpoint directory.
    resume: str = "auto"
    # A resume from a checkpoint older than the newest in run.dir is refused unless this is set; then the newer
    # checkpoints and the metrics rows after the resumed step are moved into run.dir/rewound/<UTC time>/.
    rewind: bool = False


@dataclass
class WandbConfig:
    # online (needs `wandb login` or WANDB_API_KEY), offline (run.dir/wandb/, `wandb sync` uploads it), disabled.
    mode: str = "offline"
    # The W&B project the runs are logged to.
    project: str = "nopetrain"
    # The W&B team or user; null: the logged-in user's default.
    entity: str | None = None
    # Runs grouped in the W&B UI (a sweep sets its own).
    group: str | None = None
    # Labels on the W&B run.
    tags: list[str] = field(default_factory=list)


@dataclass
class TrainingEvalConfig:
    # Held-out perplexity at multiples of the current sequence length every `every` steps (0: off), logged as
    # eval/ppl_{k}x; a multiple of log_every, since it is logged with that step's metrics.
    every: int = 0
    # Lengths as multiples of the current sequence length.
    factors: list[int] = field(default_factory=lambda: [1, 2, 4])
    # Held-out documents per length (the first ones long enough) from `source`, a folder with manifest.json
    # tokenized like the training data (e.g. data/default/heldout/web).
    documents: int = 4
    # The held-out folder those documents come from; null: off.
    source: str | None = None


@dataclass
class RunConfig:
    # The run's name: its folder, its W&B run name. Starting a run of the same name resumes it.
    name: str = "${model.name}"
    # Checkpoints, config.yaml, metrics.jsonl, logs/, tokenizer/ and W&B's offline files.
    dir: str = "runs/${run.name}"
    # Set for the members of a sweep (train.py -m): the member's number and its command-line overrides, which
    # config.yaml and the W&B run's config then carry.
    sweep_member: int | None = None
    # The sweep member's own command-line overrides (set by the sweep, like sweep_member).
    sweep_overrides: list[str] = field(default_factory=list)


@dataclass
class PlanConfig:
    # The cluster a dry run (dry_run=true, nopetrain/plan.py) plans for; a real run ignores these keys.
    # Processes, one per GPU; null: $WORLD_SIZE when set (torchrun), else 1.
    world_size: int | None = None
    # GPUs of a node: what the plan's per-node figures and launch commands assume.
    gpus_per_node: int = 8
    # A device of nopetrain.metrics.GPUS (H100, H200, A100, ...): its peak and memory; peak_tflops overrides the peak.
    gpu: str = "H100"
    # Memory of one GPU in GiB for the plan's verdict; null: the table's for plan.gpu.
    gpu_memory_gib: float | None = None
    # The model FLOPs utilisation the time estimate assumes.
    mfu: float = 0.4


AC_MODES = ("none", "full", "selective")
AC_POLICIES = ("ops", "block")


@dataclass
class ActivationCheckpointingConfig:
    # What autograd keeps for backward. none: every activation; full: only each block's input, the block recomputed
    # in backward (about one more forward); selective: the blocks `every` picks, recomputed as `policy` says.
    mode: str = "none"
    # selective: blocks 0, N, 2N, ... (N = every) are checkpointed; 1 checkpoints all of them.
    every: int = 1
    # selective: ops keeps the matmul and attention outputs and recomputes the element-wise rest (norms, SiLU and
    # its product, the q/k prologue), as torchtitan's op-level selective AC does; block recomputes the block whole.
    policy: str = "ops"


@dataclass
class LossConfig:
    # Tokens whose logits exist at once: the LM head and the cross-entropy run chunk by chunk, forward and backward
    # inside one autograd function (nopetrain.kernels.linear_cross_entropy), so the loss's memory grows with the
    # chunk, not with micro-batch x vocabulary. 0: the micro-batch's logits at once.
    chunk_tokens: int = 0


@dataclass
class ProfileConfig:
    # `steps` steps from step `start` (counted from 1, as the log counts) are recorded by torch's profiler (CPU and
    # CUDA activity, memory, shapes, stacks) into run.dir/profile/, on a GPU with a CUDA memory snapshot
    # (nopetrain/profiling.py). 0 steps: off.
    steps: int = 0
    # The first profiled step, after start-up and compilation.
    start: int = 3


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    data: DataConfig = field(default_factory=DataConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: TrainingEvalConfig = field(default_factory=TrainingEvalConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    activation_checkpointing: ActivationCheckpointingConfig = field(default_factory=ActivationCheckpointingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    # Print the plan (phases, LR, parameters, FLOPs, memory per GPU, time) and exit: no process group, no data read,
    # nothing written.
    dry_run: bool = False
    # Start from pretrained weights: "hf:/local/folder" (Llama, SmolLM, SmolLM3); the model's shape comes from its
    # config.json. Ignored when resuming from one of our checkpoints.
    init_from: str | None = None
    # Optimizer steps of the whole run; phases, schedules and the DroPE switch are placed within them.
    steps: int = 100
    # Checkpoint and exit once this global step is reached; the LR schedule still spans `steps` (time-sliced jobs).
    stop_at_step: int | None = None
    # Tokens per training sequence (a phase may set its own).
    seq_len: int = 256
    # Sequences per forward and backward on each rank.
    micro_batch_size: int = 8
    # Sequences per optimizer step over all ranks; gradient accumulation = global / (micro * world size).
    global_batch_size: int = 8
    # auto: bf16 where the device supports it, else fp32.
    precision: str = "auto"
    # Model initialisation, data order and mixture draws: the same seed gives the same run.
    seed: int = 1234
    # Steps between metrics lines (console, metrics.jsonl, W&B); the only host syncs of the loop.
    log_every: int = 10
    # Peak FLOP/s per device for MFU; when unset it comes from the device table in nopetrain.metrics.
    peak_tflops: float | None = None
    # Optimizer steps in a row with non-finite gradients (each skipped) before the run stops with exit code 3.
    max_consecutive_nonfinite: int = 5
    # torch.compile the model's forward and loss as one graph.
    compile: bool = False
    # The fused q/k prologue: auto (Triton kernel on CUDA, PyTorch reference on CPU), triton, or torch.
    kernels: str = "auto"
    # Deterministic attention backward on a GPU (flash-attn's accumulates with atomics by default): a resumed run then
    # repeats a straight one bit for bit there as on CPU, at some speed.
    deterministic: bool = False


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate_model(cfg: ModelConfig) -> None:
    """Checks a model config; raises ConfigError naming the first bad key."""
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
        _require(getattr(cfg, key) > 0, f"model.{key}={getattr(cfg, key)} must be positive")
    if cfg.head_dim is None:
        _require(
            cfg.hidden_size % cfg.num_heads == 0,
            f"model.num_heads={cfg.num_heads} must divide model.hidden_size={cfg.hidden_size} (or set model.head_dim)",
        )
    _require(cfg.resolved_head_dim % 2 == 0, f"model.head_dim={cfg.resolved_head_dim} must be even for RoPE")
    _require(
        cfg.num_heads % cfg.num_kv_heads == 0,
        f"model.num_kv_heads={cfg.num_kv_heads} must divide model.num_heads={cfg.num_heads}",
    )
    _require(
        cfg.no_rope_layer_interval is None or cfg.no_rope_layers is None,
        "model.no_rope_layer_interval and model.no_rope_layers are exclusive; set one of them",
    )
    if cfg.no_rope_layer_interval is not None:
        _require(
            cfg.no_rope_layer_interval >= 0,
            f"model.no_rope_layer_interval={cfg.no_rope_layer_interval} must be >= 0 (0 means RoPE everywhere)",
        )
    if cfg.no_rope_layers is not None:
        _require(
            len(cfg.no_rope_layers) == cfg.num_layers,
            f"model.no_rope_layers has {len(cfg.no_rope_layers)} entries, model.num_layers={cfg.num_layers}",
        )
        _require(
            all(flag in (0, 1) for flag in cfg.no_rope_layers),
            f"model.no_rope_layers={list(cfg.no_rope_layers)} must hold only 1 (RoPE) and 0 (NoPE)",
        )
    _require(cfg.qk_norm in QK_NORM_CHOICES, f"model.qk_norm={cfg.qk_norm!r} must be one of {QK_NORM_CHOICES}")
    _require(cfg.rope_theta > 0, f"model.rope_theta={cfg.rope_theta} must be positive")
    _require(
        cfg.sliding_window is None or cfg.sliding_window > 0,
        f"model.sliding_window={cfg.sliding_window} must be positive or null",
    )
    _require(cfg.attn_logit_scale > 0, f"model.attn_logit_scale={cfg.attn_logit_scale} must be positive")
    _require(
        cfg.train_context is None or cfg.train_context > 0,
        f"model.train_context={cfg.train_context} must be positive or null",
    )
    _require(
        cfg.logit_scale_coef == 0.0 or cfg.train_context is not None,
        f"model.logit_scale_coef={cfg.logit_scale_coef} needs model.train_context (the length it is relative to)",
    )


def check_run_dir(run_dir: str) -> None:
    _require(not Path(run_dir).exists() or Path(run_dir).is_dir(), f"run.dir={run_dir} exists and is not a directory")


class RunDirCheck(Callback):
    """check_run_dir before Hydra makes run.dir its output folder (configs/train.yaml), where a file in the way
    would end in a FileExistsError traceback instead of train.py's one-line error."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)

    @staticmethod
    def _check(config: DictConfig) -> None:
        try:
            check_run_dir(config.run.dir)
        except ConfigError as err:
            print(f"nopetrain: error: {err}", file=sys.stderr)
            sys.exit(REFUSED)


def planned_world_size(cfg: TrainConfig) -> int:
    """The world size a dry run plans for: plan.world_size, else $WORLD_SIZE (set by torchrun), else 1."""
    if cfg.plan.world_size is not None:
        return cfg.plan.world_size
    return int(os.environ.get("WORLD_SIZE", "1"))


def validate_plan(cfg: PlanConfig, world_size: int) -> None:
    """Checks a dry run's cluster of `world_size` GPUs; raises ConfigError naming the first bad key."""
    _require(world_size > 0, f"plan.world_size={world_size} must be positive")
    _require(cfg.gpus_per_node > 0, f"plan.gpus_per_node={cfg.gpus_per_node} must be positive")
    _require(0 < cfg.mfu <= 1, f"plan.mfu={cfg.mfu} must be in (0, 1]")
    _require(
        cfg.gpu_memory_gib is None or cfg.gpu_memory_gib > 0,
        f"plan.gpu_memory_gib={cfg.gpu_memory_gib} must be positive or null",
    )
    _require(
        world_size <= cfg.gpus_per_node or world_size % cfg.gpus_per_node == 0,
        f"plan.world_size={world_size} must fill whole nodes of plan.gpus_per_node={cfg.gpus_per_node}",
    )


def unknown_keys(node: object, prefix: str = "") -> list[str]:
    """Keys a config holds that its schema does not name: what `+key=value` adds, which OmegaConf attaches to the
    dataclass instead of refusing (a typo such as `+modle=tiny` would otherwise be ignored)."""
    if isinstance(node, dict):
        return [key for name, value in node.items() for key in unknown_keys(value, f"{prefix}{name}.")]
    if isinstance(node, list):
        return [
            key for index, value in enumerate(node) for key in unknown_keys(value, f"{prefix.rstrip('.')}[{index}].")
        ]
    if not dataclasses.is_dataclass(node):
        return []
    names = {f.name for f in dataclasses.fields(node)}
    found = [f"{prefix}{name}" for name in vars(node) if name not in names]
    return found + [key for name in names for key in unknown_keys(getattr(node, name), f"{prefix}{name}.")]


def validate(cfg: TrainConfig, world_size: int) -> None:
    """Checks a whole training config for a given world size; raises ConfigError naming the first bad key."""
    unknown = unknown_keys(cfg)
    _require(not unknown, f"{', '.join(unknown)}: not a key of the config (see docs/configuration.md)")
    validate_model(cfg.model)
    _require(cfg.deepspeed.stage in (1, 2, 3), f"deepspeed.stage={cfg.deepspeed.stage} must be 1, 2 or 3")
    _require(
        not cfg.deepspeed.offload_params or cfg.deepspeed.stage == 3,
        "deepspeed.offload_params needs deepspeed.stage=3",
    )
    for key in ("steps", "seq_len", "micro_batch_size", "global_batch_size", "log_every", "max_consecutive_nonfinite"):
        _require(getattr(cfg, key) > 0, f"{key}={getattr(cfg, key)} must be positive")
    _require(
        cfg.stop_at_step is None or 0 < cfg.stop_at_step <= cfg.steps,
        f"stop_at_step={cfg.stop_at_step} must be in [1, steps={cfg.steps}]",
    )
    per_step = cfg.micro_batch_size * world_size
    _require(
        cfg.global_batch_size % per_step == 0,
        f"global_batch_size={cfg.global_batch_size} must be a multiple of micro_batch_size x world size = {per_step}",
    )
    _require(cfg.kernels in ("auto", "triton", "torch"), f"kernels={cfg.kernels!r} must be auto, triton or torch")
    _require(cfg.precision in ("auto", "bf16", "fp32"), f"precision={cfg.precision!r} must be auto, bf16 or fp32")
    _require(cfg.schedule.name in ("cosine", "wsd"), f"schedule.name={cfg.schedule.name!r} must be cosine or wsd")
    _require(cfg.schedule.warmup_steps >= 0, f"schedule.warmup_steps={cfg.schedule.warmup_steps} must be >= 0")
    _require(
        0.0 <= cfg.schedule.min_lr_ratio <= 1.0, f"schedule.min_lr_ratio={cfg.schedule.min_lr_ratio} must be in [0, 1]"
    )
    _require(
        0.0 < cfg.schedule.decay_fraction <= 1.0,
        f"schedule.decay_fraction={cfg.schedule.decay_fraction} must be in (0, 1]",
    )
    # lr 0 is a run that changes no weight (a test of loading); below 0 it would ascend the loss.
    _require(0 <= cfg.optim.lr < math.inf, f"optim.lr={cfg.optim.lr} must be finite and >= 0")
    _require(len(cfg.optim.betas) == 2, f"optim.betas={list(cfg.optim.betas)} must have two entries")
    _require(all(0 <= beta < 1 for beta in cfg.optim.betas), f"optim.betas={list(cfg.optim.betas)} must be in [0, 1)")
    _require(cfg.optim.eps > 0, f"optim.eps={cfg.optim.eps} must be positive")
    _require(cfg.optim.weight_decay >= 0, f"optim.weight_decay={cfg.optim.weight_decay} must be >= 0")
    # DeepSpeed reads gradient_clipping=0 as no clipping.
    _require(cfg.optim.grad_clip >= 0, f"optim.grad_clip={cfg.optim.grad_clip} must be >= 0 (0: no clipping)")
    _require(
        cfg.curriculum.drope.lr is None or 0 <= cfg.curriculum.drope.lr < math.inf,
        f"curriculum.drope.lr={cfg.curriculum.drope.lr} must be finite and >= 0, or null",
    )
    check_run_dir(cfg.run.dir)
    _require(cfg.checkpoint.every > 0, f"checkpoint.every={cfg.checkpoint.every} must be positive")
    _require(cfg.checkpoint.keep > 0, f"checkpoint.keep={cfg.checkpoint.keep} must be positive")
    outside = [step for step in cfg.checkpoint.keep_steps if not 1 <= step <= cfg.steps]
    _require(not outside, f"checkpoint.keep_steps has {outside[:1]}, outside the run's steps 1-{cfg.steps}")
    _require(
        cfg.wandb.mode in ("online", "offline", "disabled"),
        f"wandb.mode={cfg.wandb.mode!r} must be online, offline or disabled",
    )
    if cfg.eval.every:
        _require(
            cfg.eval.every > 0 and cfg.eval.every % cfg.log_every == 0,
            f"eval.every={cfg.eval.every} must be a multiple of log_every={cfg.log_every} (or 0: off)",
        )
        _require(cfg.eval.source is not None, "eval.every is set but eval.source (a held-out source) is not")
        _require(cfg.eval.documents > 0, f"eval.documents={cfg.eval.documents} must be positive")
        _require(
            bool(cfg.eval.factors) and all(f >= 1 for f in cfg.eval.factors),
            f"eval.factors={list(cfg.eval.factors)} must be >= 1",
        )
    ac = cfg.activation_checkpointing
    _require(ac.mode in AC_MODES, f"activation_checkpointing.mode={ac.mode!r} must be one of {AC_MODES}")
    _require(ac.every > 0, f"activation_checkpointing.every={ac.every} must be positive")
    _require(ac.policy in AC_POLICIES, f"activation_checkpointing.policy={ac.policy!r} must be one of {AC_POLICIES}")
    _require(cfg.loss.chunk_tokens >= 0, f"loss.chunk_tokens={cfg.loss.chunk_tokens} must be >= 0 (0: no chunks)")
    _require(cfg.profile.steps >= 0, f"profile.steps={cfg.profile.steps} must be >= 0 (0: off)")
    _require(cfg.profile.start >= 1, f"profile.start={cfg.profile.start} must be >= 1 (steps count from 1)")
    _require(cfg.data.kind in ("shards", "synthetic"), f"data.kind={cfg.data.kind!r} must be shards or synthetic")
    _require(cfg.data.on_error in ("raise", "skip"), f"data.on_error={cfg.data.on_error!r} must be raise or skip")
    _require(cfg.data.num_workers >= 0, f"data.num_workers={cfg.data.num_workers} must be >= 0")
    if cfg.data.kind == "shards":
        _require(bool(cfg.data.sources), "data.sources is empty; name at least one source for data.kind=shards")
        for name, source in cfg.data.sources.items():
            _require(source.weight >= 0, f"data.sources.{name}.weight={source.weight} must be >= 0")
        _require(
            sum(source.weight for source in cfg.data.sources.values()) > 0,
            "data.sources: at least one weight must be positive",
        )


def register_configs() -> None:
    """Registers the schema so that configs/train.yaml composes on top of it, and the resolver its Hydra folders use
    (a dry run's are the current folder)."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    OmegaConf.register_new_resolver("unless_dry_run", lambda path, dry_run: "." if dry_run else path, replace=True)
