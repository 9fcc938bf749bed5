"""Compute ops the model calls: attention backends and the q/k prologue (per-head RMS norm + RoPE).

Installed as `nopetrain.kernels` (see pyproject.toml): a top-level `kernels` package would clash with the PyPI
package of that name. Each op has a plain PyTorch reference that the CPU path runs and faster paths are tested
against: the prologue runs the fused Triton kernel (fused_qk_norm_rope.py) on CUDA by default (`kernels=auto`).
"""

from __future__ import annotations

import importlib.util

import torch

from nopetrain.kernels import reference
from nopetrain.kernels.attention import (
    DocumentSegments,
    attention,
    flash_attn_available,
    set_attention_backend,
)
from nopetrain.kernels.fused_qk_norm_rope import qk_norm_rope_fused
from nopetrain.kernels.reference import apply_rope, rms_norm

BACKENDS = ("auto", "triton", "torch")
_HAS_TRITON = importlib.util.find_spec("triton") is not None
_backend = "auto"


def set_backend(name: str) -> None:
    """The q/k prologue: "triton" (the fused kernel), "torch" (the reference), "auto" (triton for CUDA tensors)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"kernels={name!r} must be one of {BACKENDS}")
    _backend = name


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
    """The attention prologue (semantics: reference.qk_norm_rope) on the selected backend."""
    if _backend == "triton" or (_backend == "auto" and q.is_cuda and _HAS_TRITON):
        return qk_norm_rope_fused(q, k, q_norm_weight, k_norm_weight, cos, sin, q_scale, eps)
    return reference.qk_norm_rope(q, k, q_norm_weight, k_norm_weight, cos, sin, q_scale, eps)


__all__ = [
    "BACKENDS",
    "DocumentSegments",
    "apply_rope",
    "attention",
    "flash_attn_available",
    "qk_norm_rope",
    "rms_norm",
    "set_attention_backend",
    "set_backend",
]
