"""Activation checkpointing: which blocks recompute their activations in backward, and what they keep.

Non-reentrant `torch.utils.checkpoint`, not DeepSpeed's `deepspeed.checkpointing`: it is what torch.compile traces
(so a compiled step stays one graph), it takes the block's arguments as they are (document segments, RoPE tables,
None for a NoPE layer) rather than tensors only, it lets a policy choose op by op what to keep (selective AC), and it
works unchanged under ZeRO-1/2/3, whose hooks gather a block's parameters again when it is recomputed. DeepSpeed's
own adds partitioning of the kept inputs across model-parallel ranks and their CPU offload: this framework has no
tensor parallelism to partition over, and with full recompute the inputs kept are one hidden state per block
(2 x hidden_size bytes per token in bf16: 147 KiB per token for SmolLM3-3B's 36 blocks), small beside the rest.

Recomputation repeats the forward's ops on the same inputs in the same order, so losses and gradients are those of
no checkpointing bit for bit (no dropout here; tested in fp32 over ZeRO-2 and ZeRO-3 across a DroPE switch). What a
block's forward reads from its module (RoPE or not, which QK-norm) is passed in as arguments by
`Transformer.forward`, so the recomputation in backward sees the values of its forward by construction.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from nopetrain.config import ActivationCheckpointingConfig

aten = torch.ops.aten

# Kept by the `ops` policy: the matmuls (the work of a block) and attention (whose recompute would be a second
# attention forward). Everything else (norms, SiLU and the gate product, the q/k prologue) is recomputed. `bmm` is
# deliberately absent: SDPA's math fallback makes its seq x seq scores with it.
SAVED_OPS = {
    aten.mm.default,
    aten.addmm.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _flash_attn_ops() -> set[Any]:
    """flash-attn's forward ops (torch.library custom ops since 2.6), where flash-attn is loaded."""
    namespace = getattr(torch.ops, "flash_attn", None)
    names = ("_flash_attn_forward", "_flash_attn_varlen_forward")
    return {getattr(namespace, name).default for name in names if namespace is not None and hasattr(namespace, name)}


def _keep_matmuls_and_attention(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    if op in SAVED_OPS or op in _flash_attn_ops():
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def checkpointed_blocks(cfg: ActivationCheckpointingConfig, num_layers: int) -> list[str | None]:
    """Per block: None (activations kept), "block" (recomputed whole) or "ops" (matmuls and attention kept)."""
    if cfg.mode == "none":
        return [None] * num_layers
    if cfg.mode == "full":
        return ["block"] * num_layers
    return [cfg.policy if index % cfg.every == 0 else None for index in range(num_layers)]


def run_checkpointed(policy: str, block: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """`block(*args)` with its activations recomputed in backward as `policy` ("block" or "ops") says."""
    if policy == "ops":
        context = functools.partial(create_selective_checkpoint_contexts, _keep_matmuls_and_attention)
        return checkpoint(block, *args, use_reentrant=False, context_fn=context)
    return checkpoint(block, *args, use_reentrant=False)
