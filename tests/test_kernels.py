"""The ops behind nopetrain.kernels against explicit computations; the flash-attn path against SDPA on a GPU."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nopetrain.data import batch_from_chunks
from nopetrain.kernels import attention, flash_attn_available, qk_norm_rope, set_attention_backend

from .helpers import gpu

# The module, which the package's `attention` function shadows as an attribute.
attention_module = importlib.import_module("nopetrain.kernels.attention")


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


def packed_inputs(device: str = "cpu", dtype: torch.dtype = torch.float32, seq: int = 96):
    """q, k, v of two rows of packed documents (different boundaries per row) and their segments."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, seq, 4, 16, generator=gen)
    k, v = torch.randn(2, seq, 2, 16, generator=gen), torch.randn(2, seq, 2, 16, generator=gen)
    starts = [np.array([30, 50]), np.array([7, 61, 80])]
    segments = batch_from_chunks(np.zeros((2, seq + 1), dtype=np.int64), starts, document_masking=True).segments
    return (*(t.to(device, dtype) for t in (q, k, v)), segments.to(torch.device(device)))


@pytest.fixture
def flex_backend():
    set_attention_backend("flex")
    yield
    set_attention_backend("auto")


@pytest.mark.parametrize("window", [None, 24])
def test_flex_attention_keeps_documents_apart_without_a_dense_mask(flex_backend, monkeypatch, window):
    """The path CUDA takes without flash-attn, forced on CPU: FlexAttention with a block mask from the segment ids.
    Its output is the dense-mask reference's; the dense (seq, seq) mask is never built (the reference's builder
    raises here), and the layers of a micro-batch share one block mask per window."""
    q, k, v, segments = packed_inputs()
    dense = attention_module._mask(96, 96, window, segments, q.device)
    expected = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=dense, enable_gqa=True)
    expected = expected.transpose(1, 2)

    def dense_mask(*args):
        raise AssertionError("a dense seq x seq mask was built")

    monkeypatch.setattr(attention_module, "_mask", dense_mask)
    assert attention_module.attention_backend(q, masked=True) == "flex"
    out = attention(q, k, v, window, segments)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert list(segments.block_masks) == [window]
    again = attention(q, k, v, window, segments)
    assert torch.equal(again, out) and len(segments.block_masks) == 1


def test_cpu_auto_takes_the_reference_and_unmasked_attention_never_takes_flex():
    q = torch.zeros(1, 4, 2, 8)
    assert attention_module.attention_backend(q, masked=True) == "sdpa"
    set_attention_backend("flex")
    try:
        assert attention_module.attention_backend(q, masked=False) == "sdpa"
    finally:
        set_attention_backend("auto")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 24])
def test_flex_attention_gradients_match_the_reference_on_gpu(flex_backend, window):
    """FlexAttention's backward (it has none on CPU) against the dense-mask reference's, bf16."""
    q, k, v, segments = packed_inputs("cuda", torch.bfloat16, seq=256)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    attention(*leaves, window, segments).float().square().sum().backward()
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    mask = attention_module._mask(256, 256, window, segments, q.device)
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in ref_leaves), attn_mask=mask, enable_gqa=True)
    ref.transpose(1, 2).float().square().sum().backward()
    for ours, theirs in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad, atol=5e-2, rtol=5e-2)
