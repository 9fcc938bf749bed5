"""Causal attention, optionally within documents only and within a sliding window.

Backends, chosen per call (`set_attention_backend`, default "auto"):
- flash-attn (CUDA, bf16/fp16) where its CUDA extension imports and the GPU can run it (Ampere or newer): varlen for
  packed documents, its own window;
- FlexAttention (torch's, compiled to Triton on CUDA) for packed documents or a window on CUDA without flash-attn: a
  block mask built from the documents' segment ids, so no seq x seq mask ever exists and fully masked blocks are
  skipped; SDPA would take a dense (batch, seq, seq) mask and fall back to its O(seq^2)-memory math kernel;
- SDPA otherwise: causal without a mask (its fused kernels), or with the dense mask on CPU (the reference, and the
  path a KV cache's decoding takes).
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "flash", "flex", "sdpa")


@functools.cache
def flash_attn_available() -> bool:
    """flash-attn can run here: CUDA, its compiled extension imports (the package alone may be a broken build), and
    the GPU is Ampere or newer (flash-attn 2's floor)."""
    if not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        import flash_attn_2_cuda  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability()[0] >= 8


_backend = "auto"
# flash-attn's backward accumulates dq with atomics unless asked not to: exact resume on a GPU needs it deterministic.
_deterministic = False


def set_attention_backend(name: str, deterministic: bool = False) -> None:
    """ "auto" (flash-attn where it runs, FlexAttention for masked attention on CUDA without it, else SDPA),
    "flash", "flex" or "sdpa"; `deterministic` makes flash-attn's backward deterministic (slower)."""
    global _backend, _deterministic
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} must be one of {BACKENDS}")
    if name == "flash" and not flash_attn_available():
        raise ValueError("attention backend flash needs flash-attn's CUDA extension and an Ampere or newer GPU")
    _backend, _deterministic = name, deterministic


def attention_backend(q: torch.Tensor, masked: bool) -> str:
    """The backend a call takes: `masked` when it has documents or a window (with as many queries as keys)."""
    half = q.dtype in (torch.float16, torch.bfloat16)
    if _backend == "flash" or (_backend == "auto" and q.is_cuda and half and flash_attn_available()):
        return "flash"
    if masked and (_backend == "flex" or (_backend == "auto" and q.is_cuda)):
        return "flex"
    return "sdpa"


@dataclass
class DocumentSegments:
    """Packed documents of a micro-batch, in the forms the backends want. Built on the host by the data loader,
    so attention needs no host sync: flash-attn's max_seqlen is the sequence length, a valid upper bound."""

    ids: torch.Tensor  # (batch, seq) int32: a segment number per token, increasing along the row
    cu_seqlens: torch.Tensor  # (segments + 1,) int32: segment boundaries in the flattened (batch * seq) tokens
    # FlexAttention's block masks by window, built once per micro-batch and shared by the layers that use them.
    block_masks: dict = field(default_factory=dict, repr=False, compare=False)

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


def _block_mask(batch: int, seq_len: int, window: int | None, segments: DocumentSegments | None, device: torch.device):
    """FlexAttention's block mask for causal attention within documents and the window, from the segment ids: on
    CUDA built by a compiled kernel block by block (`_compile`), never as a dense seq x seq mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    ids = segments.ids if segments is not None else None

    def allowed(b, h, q_index, k_index):
        keep = k_index <= q_index
        if window is not None:
            keep = keep & (q_index - k_index < window)
        if ids is not None:
            keep = keep & (ids[b, q_index] == ids[b, k_index])
        return keep

    return create_block_mask(allowed, batch, None, seq_len, seq_len, device=device, _compile=device.type == "cuda")


@functools.cache
def _flex_attention():
    """flex_attention itself: compiled on CUDA (its eager form materialises the scores; on CPU, tests only)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else flex_attention


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None, segments: DocumentSegments | None):
    """q, k, v as (batch, heads, seq, head_dim)."""
    batch, _, seq_len, _ = q.shape
    if segments is None:
        block_mask = _block_mask(batch, seq_len, window, None, q.device)
    else:
        if window not in segments.block_masks:
            segments.block_masks[window] = _block_mask(batch, seq_len, window, segments, q.device)
        block_mask = segments.block_masks[window]
    return _flex_attention()(q, k, v, block_mask=block_mask, enable_gqa=True)


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
    masked = (window is not None or segments is not None) and seq_len == k_len
    backend = attention_backend(q, masked)
    if backend == "flash":
        window_size = (window - 1, 0) if window is not None else (-1, -1)
        if segments is None:
            from flash_attn import flash_attn_func

            return flash_attn_func(q, k, v, causal=True, window_size=window_size, deterministic=_deterministic)
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
            deterministic=_deterministic,
        )
        return out.unflatten(0, (batch, seq_len))
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if backend == "flex":
        out = _flex(q, k, v, window, segments)
    elif window is None and segments is None and seq_len == k_len:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:
        mask = _mask(seq_len, k_len, window, segments, q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2)
