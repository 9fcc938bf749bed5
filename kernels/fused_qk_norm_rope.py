"""The fused q/k prologue (per-head RMS norm + RoPE + q scale) as a custom op backed by the Triton kernels.

`qk_norm_rope_fused` has the signature and semantics of `reference.qk_norm_rope`, with two documented differences:
the math stays in fp32 until one final rounding (the reference rounds to the input dtype after the norm, the gain,
RoPE and the scale), and the outputs always have the inputs' dtypes (the reference promotes to the gain's dtype when
it is wider than q/k's). cos and sin are constants here: they get no gradient.

The op is registered with `torch.library.custom_op` (`torch.ops.nopetrain.qk_norm_rope`, backward
`torch.ops.nopetrain.qk_norm_rope_backward`), with fake implementations and its autograd formula, so `torch.compile`
keeps it as one opaque node in the graph (no graph break, no tracing into Triton) and eager autograd goes through
the same registration. The Triton module is imported on first use only: importing this module never imports triton,
and on CPU (tests) `TRITON_INTERPRET=1` only has to be set before that first call.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch


@functools.cache
def _triton_kernels() -> ModuleType:
    from nopetrain.kernels import qk_norm_rope_triton

    return qk_norm_rope_triton


def _require_device(q: torch.Tensor) -> None:
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"qk_norm_rope_fused needs CUDA tensors (got {q.device}); on CPU it runs only in Triton's interpreter, "
            "with TRITON_INTERPRET=1 set before triton is first used (tests)"
        )


@torch.library.custom_op("nopetrain::qk_norm_rope", mutates_args=())
def _qk_norm_rope_op(
    q: torch.Tensor,
    k: torch.Tensor,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    q_scale: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    _require_device(q)
    return _triton_kernels().forward(q, k, q_norm_weight, k_norm_weight, cos, sin, q_scale, eps)


@_qk_norm_rope_op.register_fake
def _(q, k, q_norm_weight, k_norm_weight, cos, sin, q_scale, eps):
    # The kernel writes contiguous outputs whatever the inputs' strides; the fake ones must say the same.
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.custom_op("nopetrain::qk_norm_rope_backward", mutates_args=())
def _qk_norm_rope_backward_op(
    dq_out: torch.Tensor,
    dk_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    q_scale: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, d q_norm_weight, d k_norm_weight); a gain's gradient is an empty tensor where the gain is None
    (custom ops cannot return None)."""
    _require_device(q)
    dq, dk, dq_w, dk_w = _triton_kernels().backward(
        dq_out, dk_out, q, k, q_norm_weight, k_norm_weight, cos, sin, q_scale, eps
    )
    return dq, dk, _or_empty(dq_w, q), _or_empty(dk_w, q)


def _or_empty(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return grad if grad is not None else like.new_empty(0)


@_qk_norm_rope_backward_op.register_fake
def _(dq_out, dk_out, q, k, q_norm_weight, k_norm_weight, cos, sin, q_scale, eps):
    dq_w = q_norm_weight.new_empty(q_norm_weight.shape) if q_norm_weight is not None else q.new_empty(0)
    dk_w = k_norm_weight.new_empty(k_norm_weight.shape) if k_norm_weight is not None else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), dq_w, dk_w


def _setup_context(ctx, inputs, output) -> None:
    q, k, q_norm_weight, k_norm_weight, cos, sin, q_scale, eps = inputs
    ctx.save_for_backward(q, k, q_norm_weight, k_norm_weight, cos, sin)
    ctx.q_scale, ctx.eps = q_scale, eps


def _backward(ctx, dq_out: torch.Tensor, dk_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    q, k, q_norm_weight, k_norm_weight, cos, sin = ctx.saved_tensors
    dq, dk, dq_w, dk_w = _qk_norm_rope_backward_op(
        dq_out, dk_out, q, k, q_norm_weight, k_norm_weight, cos, sin, ctx.q_scale, ctx.eps
    )
    dq_w = dq_w if q_norm_weight is not None else None
    dk_w = dk_w if k_norm_weight is not None else None
    return dq, dk, dq_w, dk_w, None, None, None, None


_qk_norm_rope_op.register_autograd(_backward, setup_context=_setup_context)


def qk_norm_rope_fused(
    q: torch.Tensor,
    k: torch.Tensor,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    q_scale: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for `reference.qk_norm_rope`, one Triton kernel each way. q (batch, seq, heads, head_dim) and
    k (batch, seq, kv_heads, head_dim) may be strided views; outputs are contiguous. cos/sin: fp32
    (batch or 1, seq, head_dim) rotate-half tables, or both None (NoPE layer)."""
    if q_norm_weight is None and k_norm_weight is None and cos is None and q_scale == 1.0:
        # Nothing to do, as in the reference (which returns its inputs): a kernel would only copy.
        return q, k
    if (cos is not None and cos.requires_grad) or (sin is not None and sin.requires_grad):
        raise ValueError("qk_norm_rope_fused treats cos/sin as constants; they must not require grad")
    return _qk_norm_rope_op(q, k, q_norm_weight, k_norm_weight, cos, sin, float(q_scale), float(eps))
