"""Plain PyTorch reference ops: RMS norm, RoPE (rotate-half layout), and the fused q/k prologue built from them.

Math runs in fp32 and is cast back to the input dtype once at the end, the behaviour the fused kernels reproduce.
"""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS norm over the last dim, computed in fp32; the gain is applied after casting back (Hugging Face order)."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates x (batch, seq, heads, head_dim) by fp32 tables cos/sin (batch or 1, seq, head_dim)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    x32 = x.float()
    return (x32 * cos + _rotate_half(x32) * sin).to(x.dtype)


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    q_scale: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention prologue: optional per-head RMS norm of q and k, optional RoPE (None on NoPE layers), and the
    attention logit scale folded into q. q is (batch, seq, heads, head_dim), k (batch, seq, kv_heads, head_dim)."""
    if q_norm_weight is not None:
        q = rms_norm(q, q_norm_weight, eps)
    if k_norm_weight is not None:
        k = rms_norm(k, k_norm_weight, eps)
    if cos is not None:
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
    if q_scale != 1.0:
        q = q * q_scale
    return q, k
