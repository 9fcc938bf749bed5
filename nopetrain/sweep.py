"""Hydra multirun (`python train.py -m key=a,b ...`): each member is its own run in the sweep's directory, and the
sweep's runs share one W&B group."""

from __future__ import annotations

import dataclasses
import sys

from nopetrain.config import TrainConfig


def sweep_member(cfg: TrainConfig, job_num: int, overrides: list[str]) -> TrainConfig:
    """Member `job_num` of a sweep configured as `cfg`: run.dir becomes `<run.dir>/<job_num>` (Hydra's
    hydra.sweep.dir / hydra.sweep.subdir, see configs/train.yaml), so members never resume each other while a rerun
    or a requeue of the same sweep resumes each member from its own checkpoints; the W&B run is named
    `<run.name>-<job_num>` and grouped under wandb.group, by default the sweep's run.name; run.sweep_overrides
    records the member's `overrides`, and they are printed."""
    print(f"sweep member {job_num}: {' '.join(overrides)}", file=sys.stderr, flush=True)
    run = dataclasses.replace(
        cfg.run,
        name=f"{cfg.run.name}-{job_num}",
        dir=f"{cfg.run.dir}/{job_num}",
        sweep_member=job_num,
        sweep_overrides=list(overrides),
    )
    wandb = dataclasses.replace(cfg.wandb, group=cfg.wandb.group or cfg.run.name)
    return dataclasses.replace(cfg, run=run, wandb=wandb)
