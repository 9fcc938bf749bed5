"""The chunked LM head + cross-entropy (kernels/linear_cross_entropy.py) against the plain loss through the whole
logits: values and gradients, fp32 and bf16, ignored labels, a last chunk shorter than the others, no gradient
wanted; and the chunk's logits are the largest thing it makes."""

from __future__ import annotations

import pytest
import torch

from nopetrain.kernels.linear_cross_entropy import linear_cross_entropy, reference_linear_cross_entropy
from nopetrain.profiling import allocated_bytes


def inputs(dtype: torch.dtype, tokens: int = 50, dim: int = 16, vocab: int = 97):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, tokens // 2, dim, generator=gen).to(dtype).requires_grad_()
    weight = (0.3 * torch.randn(vocab, dim, generator=gen)).to(dtype).requires_grad_()
    labels = torch.randint(vocab, (2, tokens // 2), generator=gen)
    labels[0, :7] = -100
    return hidden, weight, labels


def loss_and_grads(chunk_tokens: int, dtype: torch.dtype, grad_scale: float = 1.0):
    hidden, weight, labels = inputs(dtype)
    loss = linear_cross_entropy(hidden, weight, labels, chunk_tokens)
    (grad_scale * loss).backward()
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("chunk_tokens", [1, 8, 13, 50, 64])
def test_fp32_matches_the_plain_loss(chunk_tokens):
    """Within fp32 rounding: loss to 1e-6 relative, gradients to 1e-5 relative / 1e-7 absolute. The incoming
    gradient (here 0.25, as DeepSpeed scales a loss by 1/accumulation) scales both gradients."""
    ref_loss, ref_hidden, ref_weight = loss_and_grads(0, torch.float32, 0.25)
    loss, grad_hidden, grad_weight = loss_and_grads(chunk_tokens, torch.float32, 0.25)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_hidden, ref_hidden, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_weight, ref_weight, rtol=1e-5, atol=1e-7)
    # Ignored positions get no gradient.
    assert not grad_hidden[0, :7].any()


def test_bf16_matches_the_plain_loss_to_bf16_rounding():
    """The logits are made in bf16 as the plain head makes them; the weight's gradient is summed in fp32 over
    chunks where the plain backward makes one bf16 product, so the two differ by bf16 rounding (2^-8 relative)."""
    ref_loss, ref_hidden, ref_weight = loss_and_grads(0, torch.bfloat16)
    loss, grad_hidden, grad_weight = loss_and_grads(8, torch.bfloat16)
    assert (loss.dtype, grad_hidden.dtype, grad_weight.dtype) == (torch.float32, torch.bfloat16, torch.bfloat16)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_hidden, ref_hidden, rtol=2**-7, atol=1e-4)
    torch.testing.assert_close(grad_weight, ref_weight, rtol=2**-7, atol=1e-4)


def test_without_gradients_only_the_loss_is_computed():
    hidden, weight, labels = inputs(torch.float32)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, labels, 8)
    torch.testing.assert_close(loss, reference_linear_cross_entropy(hidden, weight, labels).detach(), rtol=1e-6, atol=0)
    assert not loss.requires_grad


def test_peak_memory_follows_the_chunk_not_the_logits():
    """Bytes torch allocates beyond the inputs during forward and backward, measured by the profiler: the plain loss
    holds several copies of the (tokens, vocab) logits, the chunked one a chunk's and the gradients' (hidden states
    and one weight-sized fp32 sum)."""
    from torch.profiler import ProfilerActivity, profile

    def peak(chunk_tokens: int) -> int:
        gen = torch.Generator().manual_seed(0)
        hidden = torch.randn(4096, 32, generator=gen, requires_grad=True)
        weight = torch.randn(2048, 32, generator=gen, requires_grad=True)
        labels = torch.randint(2048, (4096,), generator=gen)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            linear_cross_entropy(hidden, weight, labels, chunk_tokens).backward()
        return allocated_bytes(prof)[0]

    logits, chunk_logits = 4096 * 2048 * 4, 256 * 2048 * 4
    plain, chunked = peak(0), peak(256)
    # Measured: 3.0 x the logits (32 MiB) for the plain loss; 2.8 MiB chunked: the gradients (hidden 0.5 MiB,
    # weight 0.25 MiB) and one chunk's logits (2 MiB), worked on in place.
    assert plain >= 2.5 * logits
    assert chunked < 1.5 * chunk_logits
