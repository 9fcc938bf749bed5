"""Causal attention: flash-attn on CUDA when it is installed, else torch SDPA."""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F


def flash_attn_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


_USE_FLASH = flash_attn_available()


def _sliding_window_mask(seq_len: int, window: int, device: torch.device) -> torch.Tensor:
    """Boolean (seq, seq) mask: query i sees keys j with i - window < j <= i."""
    offsets = torch.arange(seq_len, device=device)[:, None] - torch.arange(seq_len, device=device)[None, :]
    return (offsets >= 0) & (offsets < window)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """q (batch, seq, heads, head_dim), k and v (batch, seq, kv_heads, head_dim) -> (batch, seq, heads, head_dim).

    Softmax scale is head_dim ** -0.5; any extra logit scale is already folded into q. `window` limits each query
    to the last `window` keys (itself included)."""
    if _USE_FLASH and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        from flash_attn import flash_attn_func

        window_size = (window - 1, 0) if window is not None else (-1, -1)
        return flash_attn_func(q, k, v, causal=True, window_size=window_size)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if window is None or window >= q.shape[2]:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:
        mask = _sliding_window_mask(q.shape[2], window, q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2)
