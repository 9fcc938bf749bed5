"""The resume protocol: which checkpoint a start continues from, what may change on resume, and what happens to
the run directory's later history.

`prepare_resume` is the decision a start makes before any engine exists: the checkpoint (`checkpoint.resume`), its
trainer state, the config compared with the one it was trained with (a change that would rewrite the steps already
taken is refused in one line naming the key; other changes are logged), whether it starts DroPE on a RoPE checkpoint
(weights only, a fresh optimizer: `drope.starts_drope_on_rope_checkpoint`), and, on rank 0, the metrics rows and
(with `checkpoint.rewind`) checkpoints beyond its step moved aside into `run.dir/rewound/<UTC time>/`: a run directory
holds one history, and nothing is deleted. The trainer then loads the checkpoint (`Trainer.resume`).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist
from omegaconf import OmegaConf

from nopetrain import checkpoint
from nopetrain.config import ConfigError, TrainConfig
from nopetrain.curriculum import Schedule, resolve
from nopetrain.drope import starts_drope_on_rope_checkpoint
from nopetrain.metrics import set_aside_rows
from nopetrain.parallel import DistEnv

log = logging.getLogger("nopetrain")

# Model keys a resumed run may change; everything else must match the checkpoint's architecture.
RUNTIME_MODEL_KEYS = {"attn_logit_scale", "logit_scale_coef", "train_context"}


# Keys that say how this invocation resumes and where the run now lives (a copied or moved run.dir), or what a dry
# run plans for (plan.*), not what the run is: never reported as changed.
INVOCATION_KEYS = {"checkpoint.resume", "checkpoint.rewind", "stop_at_step", "run.dir", "dry_run"}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config dicts as `a.b.c` keys (lists stay values)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changes_the_past(key: str) -> bool:
    """Whether a resumed run with another value of `key` would no longer continue the steps already taken: the
    model's shape, the seed (it orders the shards not read yet), what the data sources are. Phase lengths, weights,
    sequence lengths and batch sizes are judged on the resolved schedule instead (see passed_schedule)."""
    if key.startswith("model."):
        return key.removeprefix("model.") not in RUNTIME_MODEL_KEYS
    return key in ("seed", "data.kind", "data.successors_per_token") or (
        key.startswith("data.sources.") and key.endswith(".path")
    )


def passed_schedule(schedule: Schedule, step: int) -> str:
    """What the first `step` steps of `schedule` ran: each phase begun (its steps up to `step`, sequence length, batch,
    weights) and the DroPE switch if it came before."""
    # Weights sorted by source: a saved config's sources come back from trainer_state.json in sorted order.
    done = [
        f"{phase.name} steps {phase.start + 1}-{min(phase.end, step)} seq_len {phase.seq_len} batch "
        f"{phase.global_batch_size} weights {dict(sorted(phase.weights.items()))}"
        for phase in schedule.phases
        if phase.start < step
    ]
    if schedule.drope_step is not None and schedule.drope_step < step:
        done.append(f"DroPE from step {schedule.drope_step + 1}")
    return "; ".join(done)


def saved_config(saved: dict[str, Any]) -> TrainConfig:
    """The config a checkpoint was trained with (`saved`: its trainer state), on today's schema."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), saved["config"]))


def check_resumed_config(saved: dict[str, Any], cfg: TrainConfig, schedule: Schedule, path: Path) -> None:
    """Compares the config of a resumed run with checkpoint `path`'s (`saved`: its trainer state). Raises ConfigError
    naming the key and both values when a change would rewrite the steps already taken; logs the other changes in one
    warning line."""
    step = saved["step"]
    old, new = flatten(saved["config"]), flatten(dataclasses.asdict(cfg))
    changed = [
        key
        for key, value in new.items()
        if key not in INVOCATION_KEYS and not key.startswith("plan.") and old.get(key) != value
    ]
    for key in changed:
        if changes_the_past(key):
            raise ConfigError(f"{key}={new[key]!r} but checkpoint {path} was trained with {key}={old.get(key)!r}")
    before, now = (
        passed_schedule(resolve(saved_config(saved), saved["world_size"]), step),
        passed_schedule(schedule, step),
    )
    if before != now:
        raise ConfigError(
            f"the config changes the curriculum's first {step} steps, which checkpoint {path} has run: "
            f"{before} -> {now}"
        )
    if changed:
        log.warning(
            "resuming from %s with a changed config (from step %d on): %s",
            path,
            step + 1,
            ", ".join(f"{key}: {old.get(key)!r} -> {new[key]!r}" for key in changed),
        )


def set_aside_later_steps(run_dir: Path, step: int, rewind: bool) -> None:
    """Moves what run_dir holds beyond `step` into run_dir/rewound/<UTC time>/: the metrics rows logged after it and,
    when rewinding, the newer checkpoints. The resumed run then appends to a history that ends at `step`; nothing is
    deleted. Rank 0 only."""
    folder = run_dir / "rewound" / datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    root = checkpoint.checkpoint_root(run_dir)
    moved = checkpoint.set_aside_newer(root, step, folder / root.name) if rewind else []
    rows = set_aside_rows(run_dir, step, folder)
    if moved or rows:
        log.warning(
            "resuming at step %d: moved %s and %d metrics row(s) of later steps to %s",
            step,
            f"checkpoint(s) {', '.join(moved)}" if moved else "no checkpoint",
            rows,
            folder,
        )


@dataclass(frozen=True)
class Resume:
    path: Path  # the checkpoint
    saved: dict[str, Any]  # its trainer state
    weights_only: bool  # DroPE started on a RoPE checkpoint: its weights, a fresh optimizer


def prepare_resume(cfg: TrainConfig, env: DistEnv, schedule: Schedule) -> Resume | None:
    """The checkpoint this start continues from, checked against the config (ConfigError naming the key when it
    cannot continue it), with what lies beyond its step set aside; None for a fresh start. Every rank calls it."""
    run_dir = Path(cfg.run.dir)
    path = checkpoint.resolve_resume(cfg.checkpoint.resume, run_dir, cfg.checkpoint.rewind)
    if path is None:
        return None
    saved = checkpoint.read_trainer_state(path)
    check_resumed_config(saved, cfg, schedule, path)
    saved_cfg = saved_config(saved)
    saved_drope_step = resolve(saved_cfg, saved["world_size"]).drope_step
    weights_only = starts_drope_on_rope_checkpoint(
        saved_cfg, saved["step"], saved_drope_step, cfg, schedule.drope_step, path
    )
    if weights_only and saved["world_size"] != env.world_size:
        raise ConfigError(
            f"checkpoint {path} was written by {saved['world_size']} process(es): start DroPE from it with as many "
            f"(this run has {env.world_size})"
        )
    if env.is_main:
        set_aside_later_steps(run_dir, saved["step"], cfg.checkpoint.rewind)
    dist.barrier()
    return Resume(path, saved, weights_only)
