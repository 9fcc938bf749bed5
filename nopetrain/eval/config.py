"""The evaluation config: dataclasses registered in Hydra's ConfigStore (configs/eval.yaml composes on top), and
`validate()`, whose errors are one line naming the key."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore

from nopetrain.config import ConfigError, unknown_keys
from nopetrain.data_pipelines.lookup_text import NIAH_TASKS
from nopetrain.rope import METHODS as ROPE_METHODS
from nopetrain.rope import YARN_RAMPS

# greedy: decode and compare the values written (per-value recall for several); teacher_forced: one forward pass over
# prompt + answer, 1 when every answer token is the argmax (whole-answer exact match, what greedy would write first).
NIAH_SCORING = ("greedy", "teacher_forced")


@dataclass
class RopeScalingConfig:
    # Applied to models with any RoPE layer, each as its own method next to `none`.
    methods: list[str] = field(default_factory=lambda: list(ROPE_METHODS))
    # YaRN's ramp bounds p and q (rotations over the training context) and its temperature coefficient.
    yarn_alpha: float = 1.0
    yarn_beta: float = 32.0
    yarn_temperature_coef: float = 0.1
    # dimension: YaRN's ramp linear over the dimension index, as transformers and the YaRN authors' code (what
    # published YaRN numbers use); rotations: linear over the rotations per training context (the paper's equation).
    yarn_ramp: str = "dimension"


@dataclass
class PerplexityConfig:
    enabled: bool = True
    # Held-out documents, the same at every length: the first ones longer than the longest length, cut to each;
    # fewer is said in one line.
    documents: int = 16
    # Position buckets in tokens; null: one training context per bucket.
    bucket: int | None = None
    batch_size: int = 4


@dataclass
class NiahConfig:
    enabled: bool = True
    tasks: list[str] = field(default_factory=lambda: list(NIAH_TASKS))
    trials: int = 20
    # Depths of the standard task's needle (fraction of the haystack); the task's score is their mean.
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    # Needles of the multi-* tasks (the paper: four), at random positions.
    needles: int = 4
    # Digits of each value (the paper: seven); a model trained on look-ups is asked values of their length.
    value_digits: int = 7
    # The held-out sources (folder names among `heldout`) whose prose the haystacks are cut from, lines in the look-up
    # format left out; only their documents that the logit-scale fit does not use (see logit_scale.sources).
    haystack: list[str] = field(default_factory=lambda: ["web"])
    # Decoding stops after the expected answer's length in tokens + 2, at most this, or once the answer is complete.
    max_new_tokens: int = 64
    batch_size: int = 8
    # One of NIAH_SCORING; the report's NIAH titles say which.
    scoring: str = "greedy"


@dataclass
class LogitScaleConfig:
    # Models whose layers are all NoPE get method `logit_scale`: c fitted once and stored beside the checkpoint.
    enabled: bool = True
    # Fit again even when the checkpoint already has logit_scale.json.
    refit: bool = False
    # Search interval for c (c < 0, i.e. beta < 1, is legitimate; low must keep beta > 0 at the largest factor:
    # low > -1 / ln(max factor), -0.48 at 8x) and the final bracket width; an optimum within the tolerance of an end
    # is reported as a boundary hit.
    low: float = -0.4
    high: float = 2.0
    tolerance: float = 0.005
    # The held-out sources the fit uses, by folder name among `heldout` (prose: web). Their documents 0, 2, 4, ...
    # are the fit's and 1, 3, 5, ... the report's, so the fit never sees a text the report scores.
    sources: list[str] = field(default_factory=lambda: ["web"])
    # Documents per fit source, the same ones at every target length (the first long enough for the longest).
    documents: int = 8


@dataclass
class GateConfig:
    # The cell that must show retrieval learned in context before comparisons beyond it mean anything; model null:
    # no gate, else results.md opens with whether the cell reached the threshold.
    model: str | None = None
    method: str = "none"
    task: str = "standard"
    factor: int = 1
    threshold: float = 0.8


@dataclass
class PairedConfig:
    # Two series as "model/method", compared by McNemar's exact test on the same prompts at each task and factor.
    a: str = "???"
    b: str = "???"
    tasks: list[str] = field(default_factory=lambda: ["standard"])
    factors: list[int] = field(default_factory=lambda: [2])


@dataclass
class ReportConfig:
    gate: GateConfig = field(default_factory=GateConfig)
    paired: list[PairedConfig] = field(default_factory=list)


@dataclass
class EvalWandbConfig:
    mode: str = "offline"
    project: str = "nopetrain"
    entity: str | None = None
    name: str | None = None


@dataclass
class EvalConfig:
    # One model: runs/NAME (its newest checkpoint), runs/NAME/checkpoints/step_N, or hf:/local/folder.
    checkpoint: str | None = None
    # Or several side by side: display name -> path as for `checkpoint` (`+models.rope=runs/a +models.drope=runs/b`).
    models: dict[str, str] = field(default_factory=dict)
    out: str = "???"
    # Held-out sources (folders with manifest.json) tokenized with the models' tokenizer.
    heldout: list[str] = field(
        default_factory=lambda: ["data/default/heldout/web", "data/default/heldout/code", "data/default/heldout/math"]
    )
    # Multiples of the training context to evaluate at.
    factors: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    # The training context; null: the run's seq_len (its last phase's if set) or HF max_position_embeddings.
    train_context: int | None = None
    seed: int = 0
    # auto: cuda when available, else cpu.
    device: str = "auto"
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    perplexity: PerplexityConfig = field(default_factory=PerplexityConfig)
    niah: NiahConfig = field(default_factory=NiahConfig)
    logit_scale: LogitScaleConfig = field(default_factory=LogitScaleConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    wandb: EvalWandbConfig = field(default_factory=EvalWandbConfig)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def model_specs(cfg: EvalConfig) -> dict[str, str]:
    """Display name -> checkpoint spec of every model the config names (one `checkpoint`: its last path part)."""
    if cfg.models:
        return dict(cfg.models)
    spec = cfg.checkpoint.rstrip("/")
    return {spec.removeprefix("hf:").rsplit("/", 1)[-1]: spec}


def split_series(series: str) -> tuple[str, str]:
    """ "model/method" -> (model, method); a model name has no "/"."""
    model, _, method = series.rpartition("/")
    return model, method


def _validate_cell(cfg: EvalConfig, key: str, model: str, method: str, tasks: list[str], factors: list[int]) -> None:
    """A report cell's model, method, tasks and factors are among those evaluated (whether the model has the method
    is known once it is loaded: `evaluate` checks it then)."""
    names = list(model_specs(cfg))
    _require(model in names, f"{key} names model {model!r}; the evaluated models are {names}")
    methods = ["none", *cfg.rope_scaling.methods, *(["logit_scale"] if cfg.logit_scale.enabled else [])]
    _require(method in methods, f"{key} names method {method!r}; the evaluated methods are {methods}")
    _require(cfg.niah.enabled, f"{key} compares NIAH results, but niah.enabled=false")
    for task in tasks:
        _require(task in cfg.niah.tasks, f"{key} names task {task!r}, not among niah.tasks={list(cfg.niah.tasks)}")
    for factor in factors:
        _require(factor in cfg.factors, f"{key} names factor {factor}, not among factors={list(cfg.factors)}")


def _validate_report(cfg: EvalConfig) -> None:
    gate = cfg.report.gate
    if gate.model is not None:
        _validate_cell(cfg, "report.gate", gate.model, gate.method, [gate.task], [gate.factor])
        _require(0 < gate.threshold <= 1, f"report.gate.threshold={gate.threshold} must be in (0, 1]")
    for index, pair in enumerate(cfg.report.paired):
        key = f"report.paired[{index}]"
        _require(bool(pair.tasks) and bool(pair.factors), f"{key}: tasks and factors must not be empty")
        for side in ("a", "b"):
            model, method = split_series(getattr(pair, side))
            _require(bool(model), f"{key}.{side}={getattr(pair, side)!r} must be model/method")
            _validate_cell(cfg, f"{key}.{side}", model, method, pair.tasks, pair.factors)


def validate(cfg: EvalConfig) -> None:
    """Raises ConfigError naming the first bad key."""
    unknown = unknown_keys(cfg)
    _require(not unknown, f"{', '.join(unknown)}: not a key of the evaluation's config (nopetrain/eval/config.py)")
    _require((cfg.checkpoint is None) != (not cfg.models), "set exactly one of checkpoint=PATH and +models.NAME=PATH")
    _require(bool(cfg.heldout), "heldout is empty; name at least one held-out source")
    names = [Path(path).name for path in cfg.heldout]
    _require(bool(cfg.factors) and all(f >= 1 for f in cfg.factors), f"factors={list(cfg.factors)} must be >= 1")
    _require(cfg.train_context is None or cfg.train_context > 0, f"train_context={cfg.train_context} must be > 0")
    _require(cfg.device in ("auto", "cpu", "cuda"), f"device={cfg.device!r} must be auto, cpu or cuda")
    for method in cfg.rope_scaling.methods:
        _require(method in ROPE_METHODS, f"rope_scaling.methods has {method!r}; choose from {ROPE_METHODS}")
    _require(
        0 <= cfg.rope_scaling.yarn_alpha < cfg.rope_scaling.yarn_beta,
        f"rope_scaling.yarn_alpha={cfg.rope_scaling.yarn_alpha} must be >= 0 and < "
        f"rope_scaling.yarn_beta={cfg.rope_scaling.yarn_beta}",
    )
    _require(
        cfg.rope_scaling.yarn_ramp in YARN_RAMPS,
        f"rope_scaling.yarn_ramp={cfg.rope_scaling.yarn_ramp!r} must be one of {YARN_RAMPS}",
    )
    for key in ("documents", "batch_size"):
        value = getattr(cfg.perplexity, key)
        _require(value > 0, f"perplexity.{key}={value} must be positive")
    _require(cfg.perplexity.bucket is None or cfg.perplexity.bucket > 0, "perplexity.bucket must be positive or null")
    for name in cfg.niah.haystack if cfg.niah.enabled else []:
        _require(name in names, f"niah.haystack has {name!r}, not a heldout source's folder name ({names})")
    _require(not cfg.niah.enabled or bool(cfg.niah.haystack), "niah.haystack is empty; name a held-out prose source")
    for task in cfg.niah.tasks:
        _require(task in NIAH_TASKS, f"niah.tasks has {task!r}; choose from {NIAH_TASKS}")
    for key in ("trials", "needles", "value_digits", "max_new_tokens", "batch_size"):
        value = getattr(cfg.niah, key)
        _require(value > 0, f"niah.{key}={value} must be positive")
    _require(cfg.niah.scoring in NIAH_SCORING, f"niah.scoring={cfg.niah.scoring!r} must be one of {NIAH_SCORING}")
    _require(
        bool(cfg.niah.depths) and all(0.0 <= d <= 1.0 for d in cfg.niah.depths),
        f"niah.depths={list(cfg.niah.depths)} must be fractions in [0, 1]",
    )
    scale = cfg.logit_scale
    _require(scale.low < scale.high, f"logit_scale.low={scale.low} must be < logit_scale.high={scale.high}")
    # beta = 1 + c ln(s) must stay positive at the largest factor, or the fit would try inverted attention.
    floor = -1 / math.log(max(cfg.factors)) if max(cfg.factors) > 1 else -math.inf
    _require(
        scale.low > floor,
        f"logit_scale.low={scale.low} must be > {floor:.4f} (-1 / ln {max(cfg.factors)}), so that beta = 1 + c ln s "
        "stays positive at every factor",
    )
    _require(scale.tolerance > 0, f"logit_scale.tolerance={scale.tolerance} must be positive")
    _require(scale.documents > 0, f"logit_scale.documents={scale.documents} must be positive")
    _require(
        not scale.enabled or (bool(scale.sources) and all(name in names for name in scale.sources)),
        f"logit_scale.sources={list(scale.sources)} must name held-out sources by folder name, from {names}",
    )
    _require(
        cfg.wandb.mode in ("online", "offline", "disabled"),
        f"wandb.mode={cfg.wandb.mode!r} must be online, offline or disabled",
    )
    _validate_report(cfg)


def register_configs() -> None:
    ConfigStore.instance().store(name="eval_schema", node=EvalConfig)
