"""DroPE: drop the rotary position embedding from every attention layer of a trained model.

After the drop the model keeps training at the same context length (recalibration); it then generalises zero-shot
beyond that length (Gelberg et al., shared/seeds/003). Optional QK-norm, switched on with unit gains, keeps
recalibration stable at high learning rates. The curriculum decides when (nopetrain/curriculum.py); the trainer
builds the model with the gains already in place (`Transformer(cfg, extra_qk_norm=...)`) so the optimizer, and
ZeRO's partitioning, hold them from the first step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from nopetrain.config import QK_NORM_CHOICES, ConfigError, DropeConfig, TrainConfig
from nopetrain.model import Transformer, qk_norm_union


def dormant_qk_norm(drope: DropeConfig, drope_step: int | None) -> str:
    """The QK-norm gains to build at the start for a DroPE switch at `drope_step` (none when there is none)."""
    return drope.qk_norm if drope_step is not None else "none"


def starts_drope_on_rope_checkpoint(
    saved: TrainConfig,
    saved_step: int,
    saved_drope_step: int | None,
    cfg: TrainConfig,
    drope_step: int | None,
    path: Path,
) -> bool:
    """Whether resuming from checkpoint `path` (saved with config `saved` at `saved_step`) starts this run's DroPE
    switch on a model saved without the QK-norm gains the switch needs: a RoPE run recalibrated, the paper's recipe.
    The checkpoint then gives only the weights (and the data and RNG state); the gains start at 1 and the optimizer
    fresh, exactly as a run that had the DroPE curriculum from the start has them at its switch when the optimizer is
    reset there. Raises ConfigError, naming the keys, for a resume that cannot be that."""
    have = qk_norm_union(saved.model.qk_norm, dormant_qk_norm(saved.curriculum.drope, saved_drope_step))
    need = qk_norm_union(cfg.model.qk_norm, dormant_qk_norm(cfg.curriculum.drope, drope_step))
    if have == need:
        return False
    if qk_norm_union(have, need) != need:
        raise ConfigError(
            f"checkpoint {path} has QK-norm gains ({have}) that this run's model lacks "
            f"(curriculum.drope.qk_norm={cfg.curriculum.drope.qk_norm!r}); resume it with the DroPE curriculum it had"
        )
    if saved_step != drope_step or not cfg.curriculum.drope.reset_optimizer:
        raise ConfigError(
            f"checkpoint {path} has no {need} QK-norm gains for curriculum.drope.qk_norm="
            f"{cfg.curriculum.drope.qk_norm!r}: DroPE can start from it only at its step, with a fresh optimizer "
            f"(curriculum.drope.at_step={saved_step} curriculum.drope.reset_optimizer=true)"
        )
    if 3 in (saved.deepspeed.stage, cfg.deepspeed.stage):
        raise ConfigError(
            f"checkpoint {path} has no {need} QK-norm gains; DroPE can start from it under ZeRO-1/2 only "
            f"(deepspeed.stage={cfg.deepspeed.stage}, saved with {saved.deepspeed.stage}), where the weights load "
            "whole without the optimizer state"
        )
    return True


def drop_rope(model: Transformer, qk_norm: str = "none") -> list[nn.Parameter]:
    """Turns every layer of `model` to NoPE in place and switches on the QK-norm `qk_norm` asks for (on top of any
    the model has); `model.config` is updated to match. Gains the model lacks are created with value 1 and
    returned, for an optimizer to adopt; a model built with `extra_qk_norm` has them already and returns []."""
    if qk_norm not in QK_NORM_CHOICES:
        raise ConfigError(f"drope.qk_norm={qk_norm!r} must be one of {QK_NORM_CHOICES}")
    cfg = model.config
    active = qk_norm_union(cfg.qk_norm, qk_norm)
    new_params: list[nn.Parameter] = []
    for layer in model.layers:
        attn = layer.attn
        like = attn.q_proj.weight
        needed = {"q_norm_weight": active in ("qk", "q"), "k_norm_weight": active == "qk"}
        for name, wanted in needed.items():
            if wanted and getattr(attn, name) is None:
                gain = nn.Parameter(torch.ones(attn.head_dim, device=like.device, dtype=like.dtype))
                setattr(attn, name, gain)
                new_params.append(gain)
        attn.use_rope = False
        attn.qk_norm = active
    cfg.no_rope_layer_interval = None
    cfg.no_rope_layers = [0] * cfg.num_layers
    cfg.qk_norm = active
    return new_params


def reset_optimizer_state(engine: Any) -> None:
    """Zeroes AdamW's moments and step counts in place (in every ZeRO partition), as for a fresh optimizer."""
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for param_state in base.state.values():
        for key, value in param_state.items():
            if torch.is_tensor(value):
                value.zero_()
            elif key == "step":
                param_state[key] = 0
    for group in base.param_groups:
        if "step" in group:
            group["step"] = 0


def switch_to_nope(engine: Any, qk_norm: str) -> None:
    """DroPE on the engine's model: every layer NoPE, QK-norm switched on with the gains built in at start."""
    if drop_rope(engine.module, qk_norm):
        raise RuntimeError("DroPE created parameters outside the optimizer; the model lacks its dormant QK-norm")
