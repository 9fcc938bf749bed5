"""Triton kernels for the fused q/k prologue: per-head RMS norm with gain, rotate-half RoPE, logit scale on q.

Semantics are those of `nopetrain.kernels.reference.qk_norm_rope`, with all math in fp32 and one rounding to the
input dtype at the end (the reference rounds after the norm, the gain, RoPE and the scale; see the tests for the
tolerances this implies).

Layout: one token (a row of batch x seq) per program in the forward, handling all q heads and then all k heads, so
the token's cos/sin are read once for both. Each head's dims are loaded as two halves, which turns rotate-half into
plain elementwise math. Inputs may have any strides (views of a fused qkv projection); outputs are contiguous.

The backward loops each program over a strided set of rows and keeps the gains' gradients in fp32 registers, so
they leave the kernel as one fp32 partial sum per program, summed in torch afterwards: deterministic, no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _load_tables(cos_ptr, sin_ptr, b, s, c_sb, c_ss, c_sd, s_sb, s_ss, s_sd, offs, dmask, HALF_DIM: tl.constexpr):
    """The token's cos and sin, each as its two halves, in fp32."""
    cos_row = cos_ptr + b * c_sb + s * c_ss
    sin_row = sin_ptr + b * s_sb + s * s_ss
    cos1 = tl.load(cos_row + offs * c_sd, mask=dmask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_row + (offs + HALF_DIM) * c_sd, mask=dmask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_row + offs * s_sd, mask=dmask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_row + (offs + HALF_DIM) * s_sd, mask=dmask, other=0.0).to(tl.float32)
    return cos1, cos2, sin1, sin2


@triton.jit
def _fwd_heads(
    x_ptr,
    out_ptr,
    w_ptr,
    b,
    s,
    row,
    n_heads,
    HALF_DIM: tl.constexpr,
    x_sb,
    x_ss,
    x_sh,
    x_sd,
    cos1,
    cos2,
    sin1,
    sin2,
    scale,
    eps,
    NORM: tl.constexpr,
    ROPE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """Norm, rotate and scale all heads of one token of x; writes the contiguous output row."""
    heads = tl.arange(0, BLOCK_H)
    offs = tl.arange(0, BLOCK_HALF)
    dmask = offs < HALF_DIM
    mask = (heads[:, None] < n_heads) & dmask[None, :]
    x_first = x_ptr + b * x_sb + s * x_ss + heads[:, None] * x_sh + offs[None, :] * x_sd
    x1 = tl.load(x_first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_first + HALF_DIM * x_sd, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        mean_sq = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF_DIM)
        rstd = tl.rsqrt(mean_sq + eps)[:, None]
        w1 = tl.load(w_ptr + offs, mask=dmask, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(w_ptr + HALF_DIM + offs, mask=dmask, other=0.0).to(tl.float32)[None, :]
        x1 = x1 * rstd * w1
        x2 = x2 * rstd * w2
    if ROPE:
        y1 = x1 * cos1[None, :] - x2 * sin1[None, :]
        y2 = x2 * cos2[None, :] + x1 * sin2[None, :]
    else:
        y1 = x1
        y2 = x2
    out_first = out_ptr + row * n_heads * 2 * HALF_DIM + heads[:, None] * 2 * HALF_DIM + offs[None, :]
    tl.store(out_first, (y1 * scale).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_first + HALF_DIM, (y2 * scale).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def qk_norm_rope_fwd_kernel(
    q_ptr,
    k_ptr,
    q_out_ptr,
    k_out_ptr,
    q_w_ptr,
    k_w_ptr,
    cos_ptr,
    sin_ptr,
    seq_len,
    n_q_heads,
    n_k_heads,
    HALF_DIM: tl.constexpr,
    q_sb,
    q_ss,
    q_sh,
    q_sd,
    k_sb,
    k_ss,
    k_sh,
    k_sd,
    c_sb,
    c_ss,
    c_sd,
    s_sb,
    s_ss,
    s_sd,
    q_scale,
    eps,
    Q_NORM: tl.constexpr,
    K_NORM: tl.constexpr,
    ROPE: tl.constexpr,
    BLOCK_QH: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    # int64 offsets: rows x strides of a fused qkv view pass 2**31 at long sequences.
    row = tl.program_id(0).to(tl.int64)
    b = row // seq_len
    s = row % seq_len
    offs = tl.arange(0, BLOCK_HALF)
    dmask = offs < HALF_DIM
    if ROPE:
        cos1, cos2, sin1, sin2 = _load_tables(cos_ptr, sin_ptr, b, s, c_sb, c_ss, c_sd, s_sb, s_ss, s_sd, offs,
                                              dmask, HALF_DIM)  # fmt: skip
    else:
        # Never read: NoPE layers skip the rotation entirely (ROPE is a compile-time flag).
        unused = tl.zeros([BLOCK_HALF], tl.float32)
        cos1, cos2, sin1, sin2 = unused, unused, unused, unused
    _fwd_heads(q_ptr, q_out_ptr, q_w_ptr, b, s, row, n_q_heads, HALF_DIM, q_sb, q_ss, q_sh, q_sd,
               cos1, cos2, sin1, sin2, q_scale, eps, Q_NORM, ROPE, BLOCK_QH, BLOCK_HALF)  # fmt: skip
    _fwd_heads(k_ptr, k_out_ptr, k_w_ptr, b, s, row, n_k_heads, HALF_DIM, k_sb, k_ss, k_sh, k_sd,
               cos1, cos2, sin1, sin2, 1.0, eps, K_NORM, ROPE, BLOCK_KH, BLOCK_HALF)  # fmt: skip


@triton.jit
def _bwd_heads(
    dout_ptr,
    x_ptr,
    dx_ptr,
    w_ptr,
    b,
    s,
    row,
    n_heads,
    HALF_DIM: tl.constexpr,
    g_sb,
    g_ss,
    g_sh,
    g_sd,
    x_sb,
    x_ss,
    x_sh,
    x_sd,
    cos1,
    cos2,
    sin1,
    sin2,
    scale,
    eps,
    NORM: tl.constexpr,
    ROPE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """Gradient for all heads of one token of x: writes dx's contiguous row, returns this token's gain gradient
    (two halves, summed over heads; zeros without a norm)."""
    heads = tl.arange(0, BLOCK_H)
    offs = tl.arange(0, BLOCK_HALF)
    dmask = offs < HALF_DIM
    mask = (heads[:, None] < n_heads) & dmask[None, :]
    g_first = dout_ptr + b * g_sb + s * g_ss + heads[:, None] * g_sh + offs[None, :] * g_sd
    g1 = tl.load(g_first, mask=mask, other=0.0).to(tl.float32) * scale
    g2 = tl.load(g_first + HALF_DIM * g_sd, mask=mask, other=0.0).to(tl.float32) * scale
    if ROPE:
        # Transpose of the rotation: y1 fed out1 (by cos1) and out2 (by sin2); y2 fed out1 (by -sin1) and out2.
        dy1 = g1 * cos1[None, :] + g2 * sin2[None, :]
        dy2 = g2 * cos2[None, :] - g1 * sin1[None, :]
    else:
        dy1 = g1
        dy2 = g2
    dw1 = tl.zeros([BLOCK_HALF], tl.float32)
    dw2 = tl.zeros([BLOCK_HALF], tl.float32)
    if NORM:
        # rstd is recomputed from x rather than saved: x is read anyway, so this costs no memory traffic.
        x_first = x_ptr + b * x_sb + s * x_ss + heads[:, None] * x_sh + offs[None, :] * x_sd
        x1 = tl.load(x_first, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_first + HALF_DIM * x_sd, mask=mask, other=0.0).to(tl.float32)
        mean_sq = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF_DIM)
        rstd = tl.rsqrt(mean_sq + eps)[:, None]
        n1 = x1 * rstd
        n2 = x2 * rstd
        dw1 = tl.sum(dy1 * n1, axis=0)
        dw2 = tl.sum(dy2 * n2, axis=0)
        dn1 = dy1 * tl.load(w_ptr + offs, mask=dmask, other=0.0).to(tl.float32)[None, :]
        dn2 = dy2 * tl.load(w_ptr + HALF_DIM + offs, mask=dmask, other=0.0).to(tl.float32)[None, :]
        # d/dx of x * rstd: rstd * (dn - n * mean(dn * n)) per head.
        proj = ((tl.sum(dn1 * n1, axis=1) + tl.sum(dn2 * n2, axis=1)) / (2 * HALF_DIM))[:, None]
        dx1 = rstd * (dn1 - n1 * proj)
        dx2 = rstd * (dn2 - n2 * proj)
    else:
        dx1 = dy1
        dx2 = dy2
    dx_first = dx_ptr + row * n_heads * 2 * HALF_DIM + heads[:, None] * 2 * HALF_DIM + offs[None, :]
    tl.store(dx_first, dx1.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dx_first + HALF_DIM, dx2.to(dx_ptr.dtype.element_ty), mask=mask)
    return dw1, dw2


@triton.jit
def qk_norm_rope_bwd_kernel(
    dq_out_ptr,
    dk_out_ptr,
    q_ptr,
    k_ptr,
    dq_ptr,
    dk_ptr,
    q_w_ptr,
    k_w_ptr,
    dq_w_partial_ptr,
    dk_w_partial_ptr,
    cos_ptr,
    sin_ptr,
    n_rows,
    seq_len,
    n_q_heads,
    n_k_heads,
    HALF_DIM: tl.constexpr,
    gq_sb,
    gq_ss,
    gq_sh,
    gq_sd,
    gk_sb,
    gk_ss,
    gk_sh,
    gk_sd,
    q_sb,
    q_ss,
    q_sh,
    q_sd,
    k_sb,
    k_ss,
    k_sh,
    k_sd,
    c_sb,
    c_ss,
    c_sd,
    s_sb,
    s_ss,
    s_sd,
    q_scale,
    eps,
    Q_NORM: tl.constexpr,
    K_NORM: tl.constexpr,
    ROPE: tl.constexpr,
    BLOCK_QH: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK_HALF)
    dmask = offs < HALF_DIM
    dwq1 = tl.zeros([BLOCK_HALF], tl.float32)
    dwq2 = tl.zeros([BLOCK_HALF], tl.float32)
    dwk1 = tl.zeros([BLOCK_HALF], tl.float32)
    dwk2 = tl.zeros([BLOCK_HALF], tl.float32)
    for r in range(pid, n_rows, tl.num_programs(0)):
        row = tl.cast(r, tl.int64)
        b = row // seq_len
        s = row % seq_len
        if ROPE:
            cos1, cos2, sin1, sin2 = _load_tables(cos_ptr, sin_ptr, b, s, c_sb, c_ss, c_sd, s_sb, s_ss, s_sd,
                                                  offs, dmask, HALF_DIM)  # fmt: skip
        else:
            unused = tl.zeros([BLOCK_HALF], tl.float32)
            cos1, cos2, sin1, sin2 = unused, unused, unused, unused
        a1, a2 = _bwd_heads(dq_out_ptr, q_ptr, dq_ptr, q_w_ptr, b, s, row, n_q_heads, HALF_DIM,
                            gq_sb, gq_ss, gq_sh, gq_sd, q_sb, q_ss, q_sh, q_sd, cos1, cos2, sin1, sin2,
                            q_scale, eps, Q_NORM, ROPE, BLOCK_QH, BLOCK_HALF)  # fmt: skip
        c1, c2 = _bwd_heads(dk_out_ptr, k_ptr, dk_ptr, k_w_ptr, b, s, row, n_k_heads, HALF_DIM,
                            gk_sb, gk_ss, gk_sh, gk_sd, k_sb, k_ss, k_sh, k_sd, cos1, cos2, sin1, sin2,
                            1.0, eps, K_NORM, ROPE, BLOCK_KH, BLOCK_HALF)  # fmt: skip
        dwq1 += a1
        dwq2 += a2
        dwk1 += c1
        dwk2 += c2
    if Q_NORM:
        tl.store(dq_w_partial_ptr + pid * 2 * HALF_DIM + offs, dwq1, mask=dmask)
        tl.store(dq_w_partial_ptr + pid * 2 * HALF_DIM + HALF_DIM + offs, dwq2, mask=dmask)
    if K_NORM:
        tl.store(dk_w_partial_ptr + pid * 2 * HALF_DIM + offs, dwk1, mask=dmask)
        tl.store(dk_w_partial_ptr + pid * 2 * HALF_DIM + HALF_DIM + offs, dwk2, mask=dmask)


def _check(
    q: torch.Tensor,
    k: torch.Tensor,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
) -> None:
    batch, seq, _, head_dim = q.shape
    if k.dim() != 4 or k.shape[:2] != q.shape[:2] or k.shape[3] != head_dim or head_dim % 2:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)}: need (batch, seq, heads, even head_dim) each")
    for name, weight in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        if weight is not None and weight.shape != (head_dim,):
            raise ValueError(f"{name} has shape {tuple(weight.shape)}, expected ({head_dim},)")
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin must both be given or both be None")
    for table in (cos, sin):
        if table is not None and (
            table.dim() != 3 or table.shape[0] not in (1, batch) or table.shape[1:] != (seq, head_dim)
        ):
            raise ValueError(f"RoPE table of shape {tuple(table.shape)}, expected (1 or {batch}, {seq}, {head_dim})")


def _table_strides(table: torch.Tensor | None) -> tuple[int, int, int]:
    """(batch, seq, dim) strides of a cos/sin table; batch stride 0 where one table serves the whole batch."""
    if table is None:
        return 0, 0, 0
    return (0 if table.shape[0] == 1 else table.stride(0)), table.stride(1), table.stride(2)


def _tiles(n_q_heads: int, n_k_heads: int, head_dim: int) -> dict[str, int]:
    """Tile sizes: heads padded to a power of two, half a head's dims likewise."""
    return {
        "BLOCK_QH": triton.next_power_of_2(n_q_heads),
        "BLOCK_KH": triton.next_power_of_2(n_k_heads),
        "BLOCK_HALF": triton.next_power_of_2(head_dim // 2),
    }


def _forward_warps(tiles: dict[str, int]) -> int:
    """About 16 fp32 values per thread for the larger of the two tiles (one head-dim half): one token per program,
    so programs are many and each is short; the forward keeps few values live (x, then y)."""
    elements = max(tiles["BLOCK_QH"], tiles["BLOCK_KH"]) * tiles["BLOCK_HALF"]
    return min(max(triton.next_power_of_2(elements // 512), 1), 8)


# The backward is memory-bound (it reads dout and x and writes dx, q's and k's, for every token) and holds many
# fp32 values per element live at once (dout, x, the rotated gradient, the normed x and the gain's gradient, both
# halves). Two limits size its launch on a GPU whose SMs have 65,536 registers:
# - Registers: at 4 elements of a half-tile per thread it compiles to at most 128 registers per thread for every
#   preset (checked ahead of time for sm_80 and sm_90 by tests/test_kernel_compile.py; at 16 elements, the old
#   heuristic's, it used 205-255 and spilled for llama2_7b's 32 x 128 heads). 128 registers allow 16 resident warps
#   per SM (65,536 / (128 x 32)).
# - Latency: a memory-bound kernel needs many loads in flight per SM to hide ~1 us of DRAM latency; the more resident
#   warps, the more. So each SM gets BACKWARD_WARPS_PER_SM warps, all the register budget allows, as programs of
#   `_backward_warps` warps each. Whether that reaches 75% of HBM bandwidth is what benchmarks/bench_qk_norm_rope.py
#   measures (its "bwd >= 75% peak" target) when a GPU is lent.
BACKWARD_ELEMENTS_PER_THREAD = 4
BACKWARD_WARPS_PER_SM = 16


def _backward_warps(tiles: dict[str, int]) -> int:
    elements = max(tiles["BLOCK_QH"], tiles["BLOCK_KH"]) * tiles["BLOCK_HALF"]
    return min(max(triton.next_power_of_2(elements // (32 * BACKWARD_ELEMENTS_PER_THREAD)), 1), 16)


def _backward_programs(device: torch.device, n_rows: int, num_warps: int) -> int:
    """Programs for the backward's row loop: on a GPU, BACKWARD_WARPS_PER_SM warps on every SM (each program then
    loops over rows, and its gains' partial sums stay one row per program); on CPU (the interpreter, tests only) a
    handful, so that the loop over several rows per program is exercised. Never more programs than rows."""
    if device.type != "cuda":
        return max(min(n_rows, 4), 1)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(min(n_rows, sms * max(BACKWARD_WARPS_PER_SM // num_warps, 1)), 1)


def forward_launch(
    q: torch.Tensor,
    k: torch.Tensor,
    q_out: torch.Tensor,
    k_out: torch.Tensor,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    q_scale: float,
    eps: float,
) -> tuple[tuple[int], tuple, dict]:
    """(grid, arguments, compile-time meta) of the forward kernel's launch: what `forward` launches, and what
    tests/test_kernel_compile.py compiles ahead of time for real GPU targets."""
    batch, seq, n_q_heads, head_dim = q.shape
    tiles = _tiles(n_q_heads, k.shape[2], head_dim)
    args = (
        q, k, q_out, k_out, q_norm_weight, k_norm_weight, cos, sin,
        seq, n_q_heads, k.shape[2], head_dim // 2,
        *q.stride(), *k.stride(), *_table_strides(cos), *_table_strides(sin),
        q_scale, eps,
    )  # fmt: skip
    flags = {"Q_NORM": q_norm_weight is not None, "K_NORM": k_norm_weight is not None, "ROPE": cos is not None}
    return (batch * seq,), args, {**flags, **tiles, "num_warps": _forward_warps(tiles)}


def backward_launch(
    dq_out: torch.Tensor,
    dk_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    dq: torch.Tensor,
    dk: torch.Tensor,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    dq_w_partial: torch.Tensor | None,
    dk_w_partial: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    q_scale: float,
    eps: float,
    programs: int,
) -> tuple[tuple[int], tuple, dict]:
    """(grid, arguments, compile-time meta) of the backward kernel's launch, as forward_launch."""
    batch, seq, n_q_heads, head_dim = q.shape
    tiles = _tiles(n_q_heads, k.shape[2], head_dim)
    args = (
        dq_out, dk_out, q, k, dq, dk, q_norm_weight, k_norm_weight, dq_w_partial, dk_w_partial, cos, sin,
        batch * seq, seq, n_q_heads, k.shape[2], head_dim // 2,
        *dq_out.stride(), *dk_out.stride(), *q.stride(), *k.stride(),
        *_table_strides(cos), *_table_strides(sin),
        q_scale, eps,
    )  # fmt: skip
    flags = {"Q_NORM": q_norm_weight is not None, "K_NORM": k_norm_weight is not None, "ROPE": cos is not None}
    return (programs,), args, {**flags, **tiles, "num_warps": _backward_warps(tiles)}


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    q_scale: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches the forward kernel; returns contiguous (q_out, k_out) in the inputs' dtypes."""
    _check(q, k, q_norm_weight, k_norm_weight, cos, sin)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if q.numel() == 0:
        return q_out, k_out
    grid, args, meta = forward_launch(q, k, q_out, k_out, q_norm_weight, k_norm_weight, cos, sin, q_scale, eps)
    qk_norm_rope_fwd_kernel[grid](*args, **meta)
    return q_out, k_out


def backward(
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Launches the backward kernel: (dq, dk, d q_norm_weight, d k_norm_weight), gains' gradients None where the
    gain is None. dq/dk are contiguous in q/k's dtypes, the gains' gradients in the gains' dtypes."""
    batch, seq, n_q_heads, head_dim = q.shape
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    warps = _backward_warps(_tiles(n_q_heads, k.shape[2], head_dim))
    programs = _backward_programs(q.device, batch * seq, warps)
    # One fp32 row per program; zeros because empty inputs launch nothing and their gains' gradients are zero.
    dq_w_partial = q.new_zeros(programs, head_dim, dtype=torch.float32) if q_norm_weight is not None else None
    dk_w_partial = q.new_zeros(programs, head_dim, dtype=torch.float32) if k_norm_weight is not None else None
    if q.numel() > 0:
        grid, args, meta = backward_launch(
            dq_out, dk_out, q, k, dq, dk, q_norm_weight, k_norm_weight, dq_w_partial, dk_w_partial, cos, sin,
            q_scale, eps, programs,
        )  # fmt: skip
        qk_norm_rope_bwd_kernel[grid](*args, **meta)
    dq_w = dq_w_partial.sum(0).to(q_norm_weight.dtype) if q_norm_weight is not None else None
    dk_w = dk_w_partial.sum(0).to(k_norm_weight.dtype) if k_norm_weight is not None else None
    return dq, dk, dq_w, dk_w
