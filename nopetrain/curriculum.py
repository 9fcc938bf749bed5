"""A run as a sequence of phases, resolved to optimizer steps, with the DroPE switch and the learning rate.

`resolve(cfg)` turns the curriculum config into a `Schedule`: each phase's first and last step, its mixture weights
per data source, sequence length and batch size; the step at which RoPE is dropped; where the WSD decay starts.
The trainer asks the schedule what happens at each step, before that step's forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nopetrain.config import QK_NORM_CHOICES, ConfigError, PhaseConfig, TrainConfig
from nopetrain.optim import lr_at, warmup_cosine


@dataclass(frozen=True)
class Phase:
    name: str
    start: int  # first optimizer step of the phase (0-based)
    end: int  # one past its last step
    weights: dict[str, float]  # per data source
    seq_len: int
    global_batch_size: int


@dataclass(frozen=True)
class Schedule:
    phases: tuple[Phase, ...]
    total_steps: int
    drope_step: int | None
    drope_warmup: int
    decay_start: int | None

    def phase_at(self, step: int) -> Phase:
        return next(phase for phase in self.phases if phase.start <= step < phase.end)

    def phase_starting_at(self, step: int) -> Phase | None:
        return next((phase for phase in self.phases if phase.start == step), None)


def _source_weights(cfg: TrainConfig, phase: PhaseConfig, index: int) -> dict[str, float]:
    """Per-source weights: a phase weights groups, and each group's weight is split over its sources in proportion
    to their own weights (evenly where they are all 0: a source kept out of the data's own mixture that a phase
    names), so one curriculum maps onto any data config whose sources name their groups."""
    sources = cfg.data.sources
    if not phase.weights:
        return {name: source.weight for name, source in sources.items()}
    groups = {name: source.group or name for name, source in sources.items()}
    for group in phase.weights:
        if sources and group not in groups.values():
            raise ConfigError(
                f"curriculum.phases[{index}].weights names {group!r}, which is no source or group of data.sources "
                f"({sorted(set(groups.values()))})"
            )
    weights = {}
    for name, source in sources.items():
        group = [s.weight for n, s in sources.items() if groups[n] == groups[name]]
        share = source.weight / sum(group) if sum(group) else 1 / len(group)
        weights[name] = phase.weights.get(groups[name], 0.0) * share
    if sources and not any(weight > 0 for weight in weights.values()):
        raise ConfigError(f"curriculum.phases[{index}].weights gives every data source weight 0")
    return weights


def _phase_steps(cfg: TrainConfig, phase: PhaseConfig, index: int, seq_len: int, batch: int) -> tuple[int, str] | None:
    """The phase's steps and the key that sets them, as `curriculum.phases[i].fraction=0.5 (50 steps)`; None for a
    phase that sets no length."""
    given = [key for key in ("steps", "tokens", "fraction") if getattr(phase, key) is not None]
    if len(given) > 1:
        raise ConfigError(f"curriculum.phases[{index}] sets {' and '.join(given)}; set at most one length")
    if phase.steps is not None:
        steps = phase.steps
    elif phase.tokens is not None:
        steps = math.ceil(phase.tokens / (seq_len * batch))
    elif phase.fraction is not None:
        steps = round(phase.fraction * cfg.steps)
    else:
        return None
    key = f"curriculum.phases[{index}].{given[0]}={getattr(phase, given[0])}"
    if steps <= 0:
        raise ConfigError(f"{key} ({phase.name}) resolves to {steps} steps; it must be positive")
    return steps, f"{key} ({steps} steps)"


def resolve(cfg: TrainConfig, world_size: int) -> Schedule:
    """The run's schedule on `world_size` processes; raises ConfigError naming the curriculum key that cannot work."""
    phase_cfgs = list(cfg.curriculum.phases) or [PhaseConfig(name="main")]
    phases: list[Phase] = []
    # The keys that set the lengths so far, for naming them when they add up to more than the run.
    lengths: list[str] = []
    start = 0
    for index, phase in enumerate(phase_cfgs):
        seq_len = phase.seq_len or cfg.seq_len
        batch = phase.global_batch_size or cfg.global_batch_size
        if batch % (cfg.micro_batch_size * world_size):
            raise ConfigError(
                f"curriculum.phases[{index}].global_batch_size={batch} must be a multiple of micro_batch_size x world "
                f"size = {cfg.micro_batch_size * world_size}"
            )
        resolved = _phase_steps(cfg, phase, index, seq_len, batch)
        if resolved is None:
            if index != len(phase_cfgs) - 1:
                raise ConfigError(f"curriculum.phases[{index}] ({phase.name}) has no length; only the last may")
            steps = cfg.steps - start
            if steps <= 0:
                raise ConfigError(
                    f"curriculum phase lengths {' + '.join(lengths)} = {start} steps leave none of steps={cfg.steps} "
                    f"for the open last phase curriculum.phases[{index}] ({phase.name})"
                )
        else:
            steps, length = resolved
            lengths.append(length)
            if start + steps > cfg.steps:
                raise ConfigError(
                    f"curriculum phase lengths {' + '.join(lengths)} = {start + steps} steps, past steps={cfg.steps}"
                )
        phases.append(Phase(phase.name, start, start + steps, _source_weights(cfg, phase, index), seq_len, batch))
        start += steps
    if start != cfg.steps:
        raise ConfigError(f"curriculum phases cover {start} steps but steps={cfg.steps}; leave the last phase open")
    names = [phase.name for phase in phases]
    if len(set(names)) != len(names):
        raise ConfigError(f"curriculum phase names {names} must be unique")
    drope_step = _drope_step(cfg, phases)
    return Schedule(tuple(phases), cfg.steps, drope_step, _drope_warmup(cfg, drope_step), _decay_start(cfg, phases))


def _start_of(phases: list[Phase], name: str, key: str) -> int:
    for phase in phases:
        if phase.name == name:
            return phase.start
    raise ConfigError(f"{key}={name!r} is not a phase ({[phase.name for phase in phases]})")


def _drope_step(cfg: TrainConfig, phases: list[Phase]) -> int | None:
    drope = cfg.curriculum.drope
    given = [key for key in ("at_step", "at_fraction", "at_phase") if getattr(drope, key) is not None]
    if len(given) > 1:
        raise ConfigError(f"curriculum.drope sets {' and '.join(given)}; set one")
    if drope.qk_norm not in QK_NORM_CHOICES:
        raise ConfigError(f"curriculum.drope.qk_norm={drope.qk_norm!r} must be one of {QK_NORM_CHOICES}")
    if drope.schedule not in ("cosine", "constant"):
        raise ConfigError(f"curriculum.drope.schedule={drope.schedule!r} must be cosine or constant")
    if drope.at_step is not None:
        step = drope.at_step
    elif drope.at_fraction is not None:
        step = round(drope.at_fraction * cfg.steps)
    elif drope.at_phase is not None:
        step = _start_of(phases, drope.at_phase, "curriculum.drope.at_phase")
    else:
        return None
    if not 0 <= step < cfg.steps:
        key = f"curriculum.drope.{given[0]}={getattr(drope, given[0])!r}"
        raise ConfigError(f"{key} resolves to step {step}, outside the run's steps 0..{cfg.steps - 1}")
    return step


def _drope_warmup(cfg: TrainConfig, drope_step: int | None) -> int:
    drope = cfg.curriculum.drope
    if drope.warmup_fraction is None:
        return drope.warmup_steps
    if drope.warmup_steps:
        raise ConfigError("curriculum.drope sets warmup_steps and warmup_fraction; set one")
    if not 0 <= drope.warmup_fraction <= 1:
        raise ConfigError(f"curriculum.drope.warmup_fraction={drope.warmup_fraction} must be in [0, 1]")
    return round(drope.warmup_fraction * (cfg.steps - (drope_step or 0)))


def _decay_start(cfg: TrainConfig, phases: list[Phase]) -> int | None:
    if cfg.curriculum.decay_phase is None:
        return None
    if cfg.schedule.name != "wsd":
        raise ConfigError(f"curriculum.decay_phase needs schedule.name=wsd, not {cfg.schedule.name!r}")
    return _start_of(phases, cfg.curriculum.decay_phase, "curriculum.decay_phase")


def learning_rate(schedule: Schedule, cfg: TrainConfig, step: int) -> float:
    """LR for optimizer step `step`: the main schedule, or after the DroPE switch its recalibration schedule
    (warmup to drope.lr, then cosine or constant to the end of the run) when drope.lr is set."""
    drope = cfg.curriculum.drope
    if schedule.drope_step is None or drope.lr is None or step < schedule.drope_step:
        return lr_at(step, schedule.total_steps, cfg.optim.lr, cfg.schedule, schedule.decay_start)
    since = step - schedule.drope_step
    if drope.schedule == "constant":
        return drope.lr * min(1.0, (since + 1) / max(1, schedule.drope_warmup))
    remaining = schedule.total_steps - schedule.drope_step
    return warmup_cosine(since, schedule.drope_warmup, remaining, drope.lr, drope.lr * drope.min_lr_ratio)
