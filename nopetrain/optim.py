"""AdamW parameter groups and the learning-rate schedules (warmup + cosine, warmup-stable-decay)."""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from nopetrain.config import OptimConfig, ScheduleConfig


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """Two AdamW groups: matrices get weight decay; norms, biases and (unless configured) embeddings do not."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        is_embedding = id(param) in embedding_ids
        if param.ndim >= 2 and (cfg.decay_embeddings or not is_embedding):
            decay.append(param)
        else:
            no_decay.append(param)
    return [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def warmup_cosine(step: int, warmup: int, total: int, peak: float, floor: float) -> float:
    """Linear warmup over `warmup` steps, then cosine from `peak` to `floor` at step `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def lr_at(step: int, total_steps: int, peak_lr: float, cfg: ScheduleConfig, decay_start: int | None = None) -> float:
    """Learning rate for optimizer step `step` (0-based) of a run of `total_steps` steps. For wsd, the linear decay
    starts at `decay_start` when given (a curriculum phase), else over the last `decay_fraction` of the run."""
    floor = peak_lr * cfg.min_lr_ratio
    if cfg.name == "cosine":
        return warmup_cosine(step, cfg.warmup_steps, total_steps, peak_lr, floor)
    if step < cfg.warmup_steps:
        return peak_lr * (step + 1) / cfg.warmup_steps
    if decay_start is None:
        decay_start = total_steps - max(1, round(total_steps * cfg.decay_fraction))
    if step < decay_start:
        return peak_lr
    return floor + (peak_lr - floor) * (total_steps - step) / max(1, total_steps - decay_start)
