"""Activation checkpointing and the chunked loss change memory, never the numbers: every mode gives the losses and
gradients of `none` bit for bit in fp32 through a real DeepSpeed engine (ZeRO-2 and ZeRO-3, packed documents, a
DroPE switch with QK-norm half-way), also with the fused q/k kernel's custom op, under torch.compile, and across a
resume; the chunked loss matches the plain one within fp32 rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from deepspeed.utils import safe_get_full_grad

from nopetrain.data import batch_from_chunks
from nopetrain.drope import switch_to_nope
from nopetrain.parallel import build_engine

from .helpers import composed, losses, run_train

MODES = {
    "full": ("activation_checkpointing.mode=full",),
    "selective_ops": ("activation_checkpointing.mode=selective", "activation_checkpointing.policy=ops"),
    "selective_every_2_blocks": (
        "activation_checkpointing.mode=selective",
        "activation_checkpointing.every=2",
        "activation_checkpointing.policy=block",
    ),
}
STEPS, DROPE_AT = 4, 2


def packed_batches(vocab: int, seq_len: int, micro_batch: int, count: int) -> list:
    """Micro-batches of packed documents (random lengths), with positions restarting and per-document masks."""
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(count):
        chunks = rng.integers(vocab, size=(micro_batch, seq_len + 1))
        starts = [np.sort(rng.choice(np.arange(1, seq_len), size=3, replace=False)) for _ in range(micro_batch)]
        batches.append(batch_from_chunks(chunks, starts, document_masking=True))
    return batches


def losses_and_gradients(process_group, *overrides: str) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """A real engine's losses and full gradients (gathered from ZeRO's partitions) over STEPS steps, RoPE dropped
    from every layer before step DROPE_AT with QK-norm switched on."""
    cfg = composed(
        "data=synthetic",
        "model.no_rope_layer_interval=2",
        "model.sliding_window=24",
        "precision=fp32",
        "kernels=torch",
        "seq_len=64",
        "micro_batch_size=2",
        "global_batch_size=2",
        "+deepspeed.extra.zero_optimization.stage3_param_persistence_threshold=0",
        *overrides,
    )
    engine = build_engine(cfg, process_group, extra_qk_norm="qk")
    assert any(engine.module.recompute) == (cfg.activation_checkpointing.mode != "none")
    step_losses, step_grads = [], []
    for step, batch in enumerate(packed_batches(cfg.model.vocab_size, cfg.seq_len, 2, STEPS)):
        if step == DROPE_AT:
            switch_to_nope(engine, "qk")
        loss = engine(batch.input_ids, batch.position_ids, batch.segments, labels=batch.labels)
        engine.backward(loss)
        step_losses.append(loss.detach().clone())
        step_grads.append({name: safe_get_full_grad(p).clone() for name, p in engine.module.named_parameters()})
        engine.step()
    return step_losses, step_grads


@pytest.mark.parametrize("stage", [2, 3])
def test_every_mode_gives_the_losses_and_gradients_of_none_bit_for_bit(process_group, stage):
    base_losses, base_grads = losses_and_gradients(process_group, f"deepspeed=zero{stage}")
    # The comparison covers both models: the QK-norm gains are unused (no gradient) until the switch.
    gain = "layers.0.attn.q_norm_weight"
    assert [bool(base_grads[step][gain].any()) for step in range(STEPS)] == [False, False, True, True]
    for name, overrides in MODES.items():
        mode_losses, mode_grads = losses_and_gradients(process_group, f"deepspeed=zero{stage}", *overrides)
        for step in range(STEPS):
            assert torch.equal(mode_losses[step], base_losses[step]), (name, step)
            assert mode_grads[step].keys() == base_grads[step].keys()
            for param, grad in mode_grads[step].items():
                assert torch.equal(grad, base_grads[step][param]), (name, step, param)


@pytest.mark.parametrize("stage", [2, 3])
def test_chunked_loss_through_zero_matches_the_plain_loss(process_group, stage):
    """The tiny model ties its embedding to the head: the head's gradient, returned by the chunked loss's backward,
    is summed with the embedding's by autograd before ZeRO reduces it. Chunks of 24 tokens leave a shorter last one
    (128 tokens a micro-batch). Losses within 1e-6 relative (1.1e-7 seen); each gradient element within 1e-4 of its
    tensor's largest (5.7e-5 seen, on ZeRO-2: the sums run in another order; elements near 0 differ by 1e-3
    relative, so no relative bound holds element by element). Deterministic: the same inputs every run."""
    plain_losses, plain_grads = losses_and_gradients(process_group, f"deepspeed=zero{stage}")
    chunked = (f"deepspeed=zero{stage}", "loss.chunk_tokens=24")
    chunked_losses, chunked_grads = losses_and_gradients(process_group, *chunked)
    for step in range(STEPS):
        torch.testing.assert_close(chunked_losses[step], plain_losses[step], rtol=1e-6, atol=0)
        for param, grad in chunked_grads[step].items():
            plain = plain_grads[step][param]
            torch.testing.assert_close(grad, plain, rtol=0, atol=1e-4 * float(plain.abs().max()))
    # Recomputing the blocks changes nothing of the chunked loss either.
    recomputed_losses, recomputed_grads = losses_and_gradients(process_group, *chunked, *MODES["selective_ops"])
    assert all(torch.equal(a, b) for a, b in zip(recomputed_losses, chunked_losses, strict=True))
    for step in range(STEPS):
        for param, grad in recomputed_grads[step].items():
            assert torch.equal(grad, chunked_grads[step][param]), (step, param)


@pytest.mark.slow
def test_a_run_with_recompute_and_chunked_loss_resumes_exactly(tmp_path):
    """train.py with full recompute and the chunked loss, stopped at step 3 and resumed, logs the losses of the run
    that went straight through; and those are the losses of a run without either (to 1e-6: the chunked loss sums
    in another order)."""
    savers = ("activation_checkpointing.mode=full", "loss.chunk_tokens=40", "steps=6", "seq_len=64")
    straight, resumed, plain = tmp_path / "straight", tmp_path / "resumed", tmp_path / "plain"
    run_train(straight, *savers)
    run_train(resumed, *savers, "stop_at_step=3")
    run_train(resumed, *savers)
    assert losses(resumed) == losses(straight)
    run_train(plain, "steps=6", "seq_len=64")
    assert losses(plain) == pytest.approx(losses(straight), rel=1e-6)
