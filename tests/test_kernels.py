"""The ops behind nopetrain.kernels against explicit computations; the flash-attn path against SDPA on a GPU."""

from __future__ import annotations

import math

import pytest
import torch

from nopetrain.kernels import attention, flash_attn_available, qk_norm_rope

from .helpers import gpu


def explicit_attention(q, k, v, window=None):
    """Softmax attention written out: causal, optional window, kv heads repeated for GQA."""
    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q.float(), k.float()) / math.sqrt(q.shape[-1])
    i = torch.arange(q.shape[1], device=q.device)[:, None]
    j = torch.arange(q.shape[1], device=q.device)[None, :]
    allowed = (j <= i) & ((i - j < window) if window else True)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v.float()).to(q.dtype)


@pytest.mark.parametrize("window", [None, 3, 64])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_sdpa_attention_matches_explicit(window, kv_heads):
    torch.manual_seed(0)
    q = torch.randn(2, 11, 4, 8)
    k, v = torch.randn(2, 11, kv_heads, 8), torch.randn(2, 11, kv_heads, 8)
    torch.testing.assert_close(attention(q, k, v, window), explicit_attention(q, k, v, window), atol=1e-5, rtol=1e-5)


def test_prologue_rotates_pairs_by_position_and_scales_q():
    # head_dim 2: RoPE is a plain rotation by angle = position (inv_freq = 1).
    q = torch.tensor([1.0, 0.0]).expand(1, 3, 1, 2)
    k = q.clone()
    angles = torch.arange(3.0)[None, :, None]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    rotated_q, rotated_k = qk_norm_rope(q, k, None, None, cos, sin, q_scale=2.0, eps=1e-6)
    expected = torch.stack([angles.cos(), angles.sin()], -1).squeeze(2)[:, :, None, :]
    torch.testing.assert_close(rotated_k, expected)
    torch.testing.assert_close(rotated_q, 2.0 * expected)


def test_prologue_norm_gives_unit_rms_per_head():
    q, k = torch.randn(2, 5, 4, 8) * 7, torch.randn(2, 5, 2, 8) * 3
    ones_q, ones_k = torch.ones(8), torch.ones(8)
    nq, nk = qk_norm_rope(q, k, ones_q, ones_k, None, None, q_scale=1.0, eps=1e-6)
    torch.testing.assert_close(nq.pow(2).mean(-1), torch.ones(2, 5, 4), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(nk.pow(2).mean(-1), torch.ones(2, 5, 2), atol=1e-4, rtol=1e-4)


@gpu
@pytest.mark.gpu
@pytest.mark.skipif(not flash_attn_available(), reason="flash-attn not installed")
@pytest.mark.parametrize("window", [None, 128])
def test_flash_attention_matches_sdpa_on_gpu(window):
    torch.manual_seed(0)
    q = torch.randn(2, 512, 8, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 512, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    torch.testing.assert_close(attention(q, k, v, window), explicit_attention(q, k, v, window), atol=2e-2, rtol=2e-2)
