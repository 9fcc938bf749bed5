"""Causal attention: flash-attn on CUDA when it is installed, else torch SDPA; optionally within documents only."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def flash_attn_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


_use_flash = flash_attn_available()


def set_attention_backend(name: str) -> None:
    """ "flash" (flash-attn, CUDA with bf16/fp16), "sdpa", or "auto" (flash where installed)."""
    global _use_flash
    if name not in ("auto", "flash", "sdpa"):
        raise ValueError(f"attention backend {name!r} must be auto, flash or sdpa")
    if name == "flash" and not flash_attn_available():
        raise ValueError("attention backend flash needs flash-attn installed and a CUDA device")
    _use_flash = name != "sdpa" and flash_attn_available()


@dataclass
class DocumentSegments:
    """Packed documents of a micro-batch, in the two forms the backends want. Built on the host by the data loader,
    so attention needs no host sync: flash-attn's max_seqlen is the sequence length, a valid upper bound."""

    ids: torch.Tensor  # (batch, seq) int32: a segment number per token, increasing along the row
    cu_seqlens: torch.Tensor  # (segments + 1,) int32: segment boundaries in the flattened (batch * seq) tokens

    def to(self, device: torch.device) -> DocumentSegments:
        return DocumentSegments(self.ids.to(device, non_blocking=True), self.cu_seqlens.to(device, non_blocking=True))


def _mask(
    q_len: int, k_len: int, window: int | None, segments: DocumentSegments | None, device: torch.device
) -> torch.Tensor:
    """Boolean mask, True where query i may see key j: j <= i, i - j < window, same document. The queries are the
    last q_len of the k_len positions (decoding with a KV cache)."""
    query_positions = torch.arange(k_len - q_len, k_len, device=device)
    offsets = query_positions[:, None] - torch.arange(k_len, device=device)[None, :]
    allowed = offsets >= 0
    if window is not None:
        allowed = allowed & (offsets < window)
    if segments is None:
        return allowed
    same_document = segments.ids[:, :, None] == segments.ids[:, None, :]
    return (allowed & same_document)[:, None]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | None = None,
    segments: DocumentSegments | None = None,
) -> torch.Tensor:
    """q (batch, seq, heads, head_dim), k and v (batch, keys, kv_heads, head_dim) -> (batch, seq, heads, head_dim).

    Softmax scale is head_dim ** -0.5; any extra logit scale is already folded into q. `window` limits each query
    to the last `window` keys (itself included); `segments` keeps attention inside each packed document. With more
    keys than queries (a KV cache) the queries are the last positions."""
    batch, seq_len = q.shape[:2]
    k_len = k.shape[1]
    if window is not None and window >= k_len:
        window = None
    if _use_flash and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        window_size = (window - 1, 0) if window is not None else (-1, -1)
        if segments is None:
            from flash_attn import flash_attn_func

            return flash_attn_func(q, k, v, causal=True, window_size=window_size)
        from flash_attn import flash_attn_varlen_func

        out = flash_attn_varlen_func(
            q.flatten(0, 1),
            k.flatten(0, 1),
            v.flatten(0, 1),
            segments.cu_seqlens,
            segments.cu_seqlens,
            seq_len,
            seq_len,
            causal=True,
            window_size=window_size,
        )
        return out.unflatten(0, (batch, seq_len))
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if window is None and segments is None and seq_len == k_len:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:
        mask = _mask(seq_len, k_len, window, segments, q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2)
