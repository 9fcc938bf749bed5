"""DroPE: drop the rotary position embedding from every attention layer of a trained model.

After the drop the model keeps training at the same context length (recalibration); it then generalises zero-shot
beyond that length (Gelberg et al., shared/seeds/003). Optional QK-norm, added with unit gains, keeps
recalibration stable at high learning rates. The curriculum decides when to call this.
"""

from __future__ import annotations

from torch import nn

from nopetrain.config import QK_NORM_CHOICES, ConfigError
from nopetrain.model import RMSNorm, Transformer


def drop_rope(model: Transformer, qk_norm: str = "none") -> list[nn.Parameter]:
    """Turns every layer of `model` to NoPE in place, adds the QK-norm gains `qk_norm` asks for where the model lacks
    them, and updates `model.config` to match. Returns the new parameters, which the optimizer must adopt."""
    if qk_norm not in QK_NORM_CHOICES:
        raise ConfigError(f"drope.qk_norm={qk_norm!r} must be one of {QK_NORM_CHOICES}")
    cfg = model.config
    new_params: list[nn.Parameter] = []
    for layer in model.layers:
        attn = layer.attn
        attn.use_rope = False
        like = attn.q_proj.weight
        if qk_norm in ("qk", "q") and attn.q_norm is None:
            attn.q_norm = RMSNorm(attn.head_dim, cfg.norm_eps).to(device=like.device, dtype=like.dtype)
            new_params.append(attn.q_norm.weight)
        if qk_norm == "qk" and attn.k_norm is None:
            attn.k_norm = RMSNorm(attn.head_dim, cfg.norm_eps).to(device=like.device, dtype=like.dtype)
            new_params.append(attn.k_norm.weight)
    cfg.no_rope_layer_interval = None
    cfg.no_rope_layers = [0] * cfg.num_layers
    if qk_norm == "qk" or (qk_norm == "q" and cfg.qk_norm == "none"):
        cfg.qk_norm = qk_norm
    return new_params
