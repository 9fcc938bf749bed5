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


def lr_at(step: int, total_steps: int, peak_lr: float, cfg: ScheduleConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) of a run of `total_steps` steps."""
    min_lr = peak_lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak_lr * (step + 1) / cfg.warmup_steps
    if cfg.name == "wsd":
        decay_steps = max(1, round(total_steps * cfg.decay_fraction))
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return peak_lr
        return min_lr + (peak_lr - min_lr) * (total_steps - step) / decay_steps
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))
