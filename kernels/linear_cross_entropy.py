"""The LM head and its cross-entropy in chunks of tokens, so that the logits of a whole micro-batch never exist.

Plain `cross_entropy(hidden @ weight.T, labels)` holds the micro-batch's logits, their fp32 copy and log-softmax, and
as backward starts their fp32 gradients: about 12 x vocabulary bytes per token, 25 GiB for a 16k-token micro-batch
at SmolLM3's 128,256 pieces. Here each chunk's logits are made, turned into that chunk's loss and its gradients
with respect to the hidden states and the head's weight, and freed before the next chunk: the gradients are taken
in the forward pass (the loss is the last op, so its incoming gradient is a scalar), kept until backward and scaled
there by it. The loss's memory is then the gradients' (hidden states and one weight-sized fp32 accumulator) plus
one chunk's logits. Liger-Kernel's fused linear cross-entropy does the same with a Triton kernel on GPU;
DeepSpeed's `TiledFusedLogitsLoss` also backpropagates inside its forward, but into the parameters' `.grad` through
autograd, so under a tied embedding the shared weight's gradient reaches ZeRO's hook twice in one micro-step, which
ZeRO-2 refuses ("embed.weight has already been reduced", tried with DeepSpeed 0.19.8); here the weight's gradient
is returned from backward, so autograd sums it with the embedding's as for any tied weight.

Semantics are `reference_linear_cross_entropy`'s (the mean over labels that are not -100), with two differences:
the weight's gradient is summed over chunks in fp32 (the plain backward makes one product in the working dtype),
and the loss is a sum of per-chunk sums; both within fp32 rounding of the plain loss
(tests/test_linear_cross_entropy.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def reference_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of logits `hidden @ weight.T`, in fp32; labels equal to -100 are ignored."""
    logits = F.linear(hidden, weight)
    return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX)


def _chunk(
    chunk: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    scale: torch.Tensor,
    grad_hidden: torch.Tensor | None,
    grad_weight: torch.Tensor | None,
) -> torch.Tensor:
    """The summed loss of one chunk of tokens; writes its part of d(loss x scale)/d hidden into grad_hidden and adds
    its part of the weight's into grad_weight, where given. A function of its own so that the chunk's logits are
    freed on return, before the next chunk makes its own."""
    kept, targets = labels != IGNORE_INDEX, labels.clamp(min=0)[:, None]
    # The logits in the working dtype, as the plain head makes them, then one fp32 copy that every later step works
    # on in place: the chunk's memory is that copy (and, in bf16, the working-dtype logits and gradient).
    logits = F.linear(chunk, weight).float()
    target_logits = logits.gather(1, targets).squeeze(1)
    row_max = logits.amax(dim=-1, keepdim=True)
    exp = logits.sub_(row_max).exp_()
    row_sum = exp.sum(dim=-1, keepdim=True)
    loss = torch.where(kept, (row_max + row_sum.log()).squeeze(1) - target_logits, 0.0).sum()
    if grad_hidden is None and grad_weight is None:
        return loss
    # d loss / d logits = softmax - one_hot(target) on counted rows, 0 elsewhere.
    grad_logits = exp.div_(row_sum)
    grad_logits.scatter_add_(1, targets, torch.full_like(targets, -1.0, dtype=grad_logits.dtype))
    grad_logits = grad_logits.mul_((kept * scale)[:, None]).to(chunk.dtype)
    if grad_hidden is not None:
        grad_hidden.copy_(grad_logits @ weight)
    if grad_weight is not None and grad_weight.dtype == chunk.dtype:
        grad_weight.addmm_(grad_logits.t(), chunk)
    elif grad_weight is not None:
        # A bf16 product is promoted as it is added to the fp32 sum, never copied whole to fp32.
        grad_weight.add_(grad_logits.t() @ chunk)
    return loss


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """loss = mean cross-entropy of (hidden @ weight.T) against labels, chunk_tokens rows of logits at a time.
    hidden (tokens, d), weight (vocab, d), labels (tokens,)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int):
        # The mean's divisor as a tensor, so that nothing is read back to the host.
        count = (labels != IGNORE_INDEX).sum()
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            total += _chunk(
                hidden[rows],
                weight,
                labels[rows],
                1 / count,
                None if grad_hidden is None else grad_hidden[rows],
                grad_weight,
            )
        ctx.save_for_backward(grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype))
        return total / count

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        # In place: the saved gradients are this function's own and backward runs once.
        return (
            None if grad_hidden is None else grad_hidden.mul_(grad_loss),
            None if grad_weight is None else grad_weight.mul_(grad_loss),
            None,
            None,
        )


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = 0
) -> torch.Tensor:
    """Mean cross-entropy of the logits `hidden @ weight.T` (hidden (..., d), labels (...), -100 ignored): in chunks
    of `chunk_tokens` tokens when it is positive, else through the whole logits (the reference)."""
    if chunk_tokens <= 0:
        return reference_linear_cross_entropy(hidden, weight, labels)
    return ChunkedLinearCrossEntropy.apply(hidden.flatten(0, -2), weight, labels.flatten(), chunk_tokens)
