"""The fused Triton q/k prologue (kernels/fused_qk_norm_rope.py) against reference.qk_norm_rope, forward and backward.

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set below before the kernels are first
built), on tiny shapes: it runs a few thousand programs per second. With CUDA the same tests run the compiled kernels.

Tolerances: fp32 and fp16 against the reference evaluated in fp32 (1e-5; 1e-3 absolute and relative). bf16: the
kernel keeps fp32 until one final rounding, so each output must be the fp32 reference rounded to bf16 or one of its
two bf16 neighbours (1 ulp, counted on the bit patterns), up to fp32 rounding noise where values cancel (see
bf16_misses). The reference run in bf16 rounds up to four more times on the way and does not meet that bound
(checked below, so the bound is known to be tight enough to see a rounding).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Read when a @triton.jit kernel is defined: the kernel module is imported on the op's first call.
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from nopetrain.kernels.fused_qk_norm_rope import qk_norm_rope_fused
from nopetrain.kernels.reference import qk_norm_rope
from nopetrain.rope import rope_tables

from .helpers import gpu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-5


def restarting_positions(batch: int, seq: int) -> torch.Tensor:
    """Packed documents: positions restart at a different offset in each row, so every row has its own tables."""
    return torch.stack([torch.arange(seq) % (3 + row) for row in range(batch)])


def make_inputs(
    batch: int = 2,
    seq: int = 7,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 64,
    dtype: torch.dtype = torch.float32,
    norm: str = "qk",
    rope: str | None = "restart",
    seed: int = 0,
) -> dict:
    """Random q, k (scaled away from unit RMS so the norm matters), random gains, and fp32 tables: "restart" gives
    per-batch tables from restarting positions, "shared" one table for the batch, None a NoPE layer."""
    gen = torch.Generator().manual_seed(seed)
    q = 3 * torch.randn(batch, seq, heads, head_dim, generator=gen)
    k = 0.5 * torch.randn(batch, seq, kv_heads, head_dim, generator=gen)
    q_w = 1 + torch.randn(head_dim, generator=gen) if norm in ("q", "qk") else None
    k_w = 1 + torch.randn(head_dim, generator=gen) if norm == "qk" else None
    cos = sin = None
    if rope is not None:
        positions = restarting_positions(batch, seq) if rope == "restart" else torch.arange(seq)[None]
        cos, sin = rope_tables(positions, head_dim, theta=10000.0)
    cast = {"q": q, "k": k, "q_norm_weight": q_w, "k_norm_weight": k_w}
    inputs = {name: t.to(DEVICE, dtype) if t is not None else None for name, t in cast.items()}
    inputs["cos"], inputs["sin"] = (t.to(DEVICE) if t is not None else None for t in (cos, sin))
    return inputs


def run(fn, inputs: dict, q_scale: float, grads: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype | None = None):
    """fn's outputs and the gradients of (q, k, q gain, k gain) (None for absent gains) for output gradients
    `grads`. With `dtype`, fn runs on copies of the inputs (and gradients) cast to it: the reference in fp32."""
    leaves = {}
    for name in ("q", "k", "q_norm_weight", "k_norm_weight"):
        tensor = inputs[name]
        if tensor is not None:
            leaves[name] = (tensor.to(dtype) if dtype else tensor).detach().requires_grad_()
    args = {**inputs, **leaves}
    out_q, out_k = fn(**args, q_scale=q_scale, eps=EPS)
    dq_out, dk_out = (g.to(dtype) if dtype else g for g in grads)
    computed = torch.autograd.grad((out_q, out_k), list(leaves.values()), (dq_out, dk_out))
    by_name = dict(zip(leaves, computed, strict=True))
    return (out_q, out_k), tuple(by_name.get(n) for n in ("q", "k", "q_norm_weight", "k_norm_weight"))


def ulp_distance(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """How many representable values of their (16-bit) dtype lie between actual and expected, from the bit
    patterns: sign-magnitude integers mapped to a monotonic order (+0 and -0 both 0)."""

    def ordered(t: torch.Tensor) -> torch.Tensor:
        bits = t.view(torch.int16).int()
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return (ordered(actual) - ordered(expected)).abs()


def bf16_misses(actual: torch.Tensor, reference32: torch.Tensor) -> torch.Tensor:
    """Where bf16 `actual` is more than 1 ulp from the fp32 reference rounded to bf16. Differences within fp32
    rounding noise (2**-20 of the tensor's largest reference value) never count: where a value cancels to thousands
    of times less than its terms (norm backward, rotation), the fp32 reference is itself only that accurate."""
    noise = (actual.float() - reference32).abs() <= 2**-20 * reference32.abs().max()
    return (ulp_distance(actual, reference32.to(torch.bfloat16)) > 1) & ~noise


def assert_matches(actual: torch.Tensor, reference32: torch.Tensor, what: str) -> None:
    """actual (in its dtype) against the reference computed in fp32, by the module's per-dtype bound."""
    if actual.dtype == torch.bfloat16:
        misses = bf16_misses(actual, reference32)
        assert not misses.any(), f"{what}: {int(misses.sum())} values more than 1 bf16 ulp from the fp32 reference"
    else:
        tol = {torch.float32: 1e-5, torch.float16: 1e-3}[actual.dtype]
        torch.testing.assert_close(actual.float(), reference32, atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


def check_against_reference(inputs: dict, q_scale: float = 0.7, seed: int = 1) -> None:
    dtype = inputs["q"].dtype
    gen = torch.Generator().manual_seed(seed)
    grads = tuple(torch.randn(inputs[n].shape, generator=gen).to(DEVICE, dtype) for n in ("q", "k"))
    outs, input_grads = run(qk_norm_rope_fused, inputs, q_scale, grads)
    ref_outs, ref_grads = run(qk_norm_rope, inputs, q_scale, grads, dtype=torch.float32)
    for name, out, ref in zip(("q_out", "k_out"), outs, ref_outs, strict=True):
        assert out.shape == ref.shape and out.dtype == dtype
        assert_matches(out, ref, name)
    for name, grad, ref in zip(("dq", "dk", "d q_norm_weight", "d k_norm_weight"), input_grads, ref_grads, strict=True):
        assert (grad is None) == (ref is None), name
        if grad is not None:
            assert_matches(grad, ref, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_matches_reference_for_each_dtype_and_gqa_ratio(dtype, group):
    check_against_reference(make_inputs(heads=2 * group, kv_heads=2, dtype=dtype, seq=5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rope", [None, "shared", "restart"])
@pytest.mark.parametrize("norm", ["qk", "q", "none"])
def test_matches_reference_with_and_without_norms_and_rope(norm, rope, dtype):
    check_against_reference(make_inputs(batch=2, seq=3, heads=2, kv_heads=1, norm=norm, rope=rope, dtype=dtype))


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_each_head_dim(head_dim):
    # 80 and 96 leave the padded lanes of each half masked off.
    check_against_reference(make_inputs(batch=1, seq=3, heads=2, kv_heads=1, head_dim=head_dim))


@pytest.mark.parametrize("q_scale", [1.0, 2.5])
def test_q_scale_alone_and_identity(q_scale):
    inputs = make_inputs(batch=1, seq=3, heads=2, kv_heads=1, norm="none", rope=None)
    check_against_reference(inputs, q_scale=q_scale)
    if q_scale == 1.0:
        # Nothing to do: like the reference, the inputs come back and no kernel runs.
        out_q, out_k = qk_norm_rope_fused(**inputs, q_scale=1.0, eps=EPS)
        assert out_q is inputs["q"] and out_k is inputs["k"]


def test_bf16_bound_is_tight_enough_to_see_the_reference_roundings():
    """The reference run in bf16 (rounding after norm, gain, RoPE and scale) is off by more than 1 ulp somewhere,
    while the fused kernel is not: the bf16 bound above can fail."""
    inputs = make_inputs(dtype=torch.bfloat16, seq=5)
    ref32, _ = qk_norm_rope(
        **{n: t.float() if t is not None else None for n, t in inputs.items()}, q_scale=0.7, eps=EPS
    )
    ref16, _ = qk_norm_rope(**inputs, q_scale=0.7, eps=EPS)
    fused, _ = qk_norm_rope_fused(**inputs, q_scale=0.7, eps=EPS)
    assert bf16_misses(ref16, ref32).any()
    assert not bf16_misses(fused, ref32).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_inputs(dtype):
    """q as a view into a fused (batch, seq, (heads + 2 kv_heads) * head_dim) qkv projection output, k as a
    head-major (batch, kv_heads, seq, head_dim) tensor transposed, a table expanded over the batch (batch stride 0),
    and output gradients with a zero head stride (expanded) and transposed."""
    batch, seq, heads, kv_heads, head_dim = 2, 5, 4, 2, 64
    inputs = make_inputs(batch, seq, heads, kv_heads, head_dim, dtype=dtype, rope="shared")
    qkv = torch.randn(batch, seq, (heads + 2 * kv_heads) * head_dim, device=DEVICE).to(dtype)
    inputs["q"] = qkv[..., : heads * head_dim].view(batch, seq, heads, head_dim)
    inputs["k"] = torch.randn(batch, kv_heads, seq, head_dim, device=DEVICE).to(dtype).transpose(1, 2)
    inputs["cos"], inputs["sin"] = (t.expand(batch, -1, -1) for t in (inputs["cos"], inputs["sin"]))
    assert not inputs["q"].is_contiguous() and not inputs["k"].is_contiguous()
    gen = torch.Generator().manual_seed(2)
    grads = (
        torch.randn(batch, seq, 1, head_dim, generator=gen).to(DEVICE, dtype).expand(-1, -1, heads, -1),
        torch.randn(seq, batch, kv_heads, head_dim, generator=gen).to(DEVICE, dtype).transpose(0, 1),
    )
    outs, input_grads = run(qk_norm_rope_fused, inputs, 0.7, grads)
    ref_outs, ref_grads = run(qk_norm_rope, inputs, 0.7, grads, dtype=torch.float32)
    for name, actual, ref in zip(
        ("q_out", "k_out", "dq", "dk", "dqw", "dkw"), outs + input_grads, ref_outs + ref_grads, strict=True
    ):
        assert_matches(actual, ref, name)


def test_rejects_what_it_cannot_do():
    inputs = make_inputs(batch=1, seq=3, heads=2, kv_heads=1)
    with pytest.raises(ValueError, match="constants"):
        qk_norm_rope_fused(**{**inputs, "cos": inputs["cos"].clone().requires_grad_()}, q_scale=1.0, eps=EPS)
    with pytest.raises(ValueError, match="RoPE table"):
        qk_norm_rope_fused(**{**inputs, "cos": inputs["cos"][:, :2]}, q_scale=1.0, eps=EPS)


def test_custom_op_registration():
    """Schema, fake (meta) implementations and autograd registration, as torch.library checks them."""
    inputs = make_inputs(batch=1, seq=3, heads=2, kv_heads=1)
    inputs["q"].requires_grad_()
    inputs["q_norm_weight"].requires_grad_()
    args = (*inputs.values(), 0.7, EPS)
    torch.library.opcheck(torch.ops.nopetrain.qk_norm_rope.default, args)


def test_torch_compile_fullgraph_keeps_the_op_as_one_node():
    """fullgraph=True fails on any graph break; the captured graph holds the custom op itself, and the compiled
    (Inductor) forward and backward match the eager op."""
    inputs = make_inputs(batch=1, seq=5, heads=4, kv_heads=2)
    graphs = []

    def recording_inductor(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return torch._inductor.compile(gm, example_inputs)

    def loss(q, k, q_norm_weight, k_norm_weight):
        out_q, out_k = qk_norm_rope_fused(q, k, q_norm_weight, k_norm_weight, inputs["cos"], inputs["sin"], 0.7, EPS)
        return out_q.float().sin().sum() + 3 * out_k.float().sum()

    leaves = [inputs[n].detach().requires_grad_() for n in ("q", "k", "q_norm_weight", "k_norm_weight")]
    eager = torch.autograd.grad(loss(*leaves), leaves)
    compiled = torch.compile(loss, fullgraph=True, backend=recording_inductor)
    traced = torch.autograd.grad(compiled(*leaves), leaves)
    assert len(graphs) == 1
    targets = [node.target for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert torch.ops.nopetrain.qk_norm_rope.default in targets, targets
    for name, got, want in zip(("dq", "dk", "dqw", "dkw"), traced, eager, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(15, 5, 64), (16, 4, 128), (32, 32, 128)])
def test_model_shapes_on_gpu(heads, kv_heads, head_dim):
    """The compiled kernels at the presets' attention shapes, long enough for many programs per SM."""
    check_against_reference(make_inputs(4, 1021, heads, kv_heads, head_dim, dtype=torch.bfloat16))


def test_model_with_the_fused_prologue_matches_the_torch_path():
    from nopetrain import kernels
    from nopetrain.config import ModelConfig
    from nopetrain.model import Transformer

    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    cfg.no_rope_layer_interval, cfg.qk_norm = 2, "qk"
    tokens = torch.randint(64, (2, 9))
    results = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        model = Transformer(cfg)
        kernels.set_backend(backend)
        try:
            loss = model(tokens[:, :-1], labels=tokens[:, 1:])
            loss.backward()
        finally:
            kernels.set_backend("auto")
        results[backend] = (loss.detach(), [p.grad for p in model.parameters()])
    torch.testing.assert_close(results["triton"][0], results["torch"][0], atol=1e-5, rtol=1e-5)
    for fused, ref in zip(results["triton"][1], results["torch"][1], strict=True):
        torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-4)


def test_recomputed_blocks_run_the_fused_op_again_to_the_same_bits():
    """Activation checkpointing re-runs the custom op in backward (its element-wise work is what `ops` recomputes):
    every mode gives the gradients of no recompute, bit for bit."""
    from nopetrain import kernels
    from nopetrain.config import ActivationCheckpointingConfig, ModelConfig
    from nopetrain.model import Transformer

    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    cfg.no_rope_layer_interval, cfg.qk_norm = 2, "qk"
    tokens = torch.randint(64, (2, 9))
    results = {}
    kernels.set_backend("triton")
    try:
        for mode in ("none", "full", "selective"):
            torch.manual_seed(0)
            model = Transformer(cfg, activation_checkpointing=ActivationCheckpointingConfig(mode))
            model(tokens[:, :-1], labels=tokens[:, 1:]).backward()
            results[mode] = [p.grad for p in model.parameters()]
    finally:
        kernels.set_backend("auto")
    for mode in ("full", "selective"):
        assert all(torch.equal(a, b) for a, b in zip(results[mode], results["none"], strict=True)), mode
