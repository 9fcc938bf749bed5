"""Compute ops the model calls: attention backends and the q/k prologue (per-head RMS norm + RoPE).

Installed as `nopetrain.kernels` (see pyproject.toml): a top-level `kernels` package would clash with the PyPI
package of that name. Each op has a plain PyTorch reference that the CPU path runs and faster paths are tested
against.
"""

from nopetrain.kernels.attention import DocumentSegments, attention, flash_attn_available
from nopetrain.kernels.reference import apply_rope, qk_norm_rope, rms_norm

__all__ = ["DocumentSegments", "apply_rope", "attention", "flash_attn_available", "qk_norm_rope", "rms_norm"]
