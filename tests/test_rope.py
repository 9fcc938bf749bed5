"""nopetrain/rope.py: the RoPE-scaling frequencies against hand-computed values and transformers' YaRN, and the
scaled model itself."""

from __future__ import annotations

import pytest
import torch

from nopetrain.rope import RopeScaling, frequency_factors, inverse_frequencies, logit_factor

from .helpers import tiny_model

# head_dim 8, theta 10^4: the base frequencies are 1, 0.1, 0.01, 0.001.
HEAD_DIM, THETA, CONTEXT = 8, 10_000.0, 64


BASE = [1.0, 0.1, 0.01, 0.001]


def factors(method: str, s: float, seq_len: int = CONTEXT, **options) -> list[float]:
    return frequency_factors(RopeScaling(method, CONTEXT, s, **options), HEAD_DIM, THETA, seq_len).tolist()


@pytest.mark.parametrize("s", [2, 4])
def test_pi_divides_every_frequency_by_s(s):
    assert factors("pi", s) == pytest.approx([1 / s] * 4)


def test_ntk_scales_frequency_m_by_s_to_the_minus_2m_over_d_minus_2():
    # d - 2 = 6: gamma_m = s^(-m/3).
    assert factors("ntk", 2) == pytest.approx([1.0, 0.7937005, 0.6299605, 0.5], rel=1e-6)
    assert factors("ntk", 4) == pytest.approx([1.0, 0.6299605, 0.3968503, 0.25], rel=1e-6)
    # The same as raising the base to theta * s^(d/(d-2)).
    ntk_base = inverse_frequencies(HEAD_DIM, THETA * 2 ** (8 / 6), None, CONTEXT)
    scaled = inverse_frequencies(HEAD_DIM, THETA, RopeScaling("ntk", CONTEXT, 2.0), CONTEXT)
    torch.testing.assert_close(scaled, ntk_base, rtol=1e-6, atol=0)


def test_yarn_ramps_over_the_dimension_index_by_default():
    # The index whose frequency makes r rotations over 64 tokens: m(r) = 8 ln(64 / (2 pi r)) / (2 ln 10^4), so
    # m(q = 32) = -0.497 -> floor, clamped to 0, and m(p = 1) = 1.008 -> ceil 2: kappa = 1 - m / 2 = 1, 0.5, 0, 0.
    assert factors("yarn", 2) == pytest.approx([1.0, 0.75, 0.5, 0.5], rel=1e-6)
    assert factors("yarn", 4) == pytest.approx([1.0, 0.625, 0.25, 0.25], rel=1e-6)
    with pytest.raises(ValueError, match="yarn_ramp 'index' must be one of"):
        RopeScaling("yarn", CONTEXT, 2.0, yarn_ramp="index")


@pytest.mark.parametrize(
    ("head_dim", "theta", "context", "s", "beta_slow", "beta_fast"),
    [
        (64, 10_000.0, 256, 2.0, 1.0, 32.0),
        (64, 10_000.0, 256, 8.0, 1.0, 32.0),
        (128, 500_000.0, 4096, 4.0, 1.0, 32.0),
        (64, 100_000.0, 2048, 16.0, 2.0, 16.0),
    ],
)
def test_yarn_equals_transformers(head_dim, theta, context, s, beta_slow, beta_fast):
    """Our YaRN frequencies and temperature against transformers' own for the same config."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    parameters = {"rope_type": "yarn", "rope_theta": theta, "factor": s, "original_max_position_embeddings": context}
    hf_config = LlamaConfig(
        hidden_size=4 * head_dim,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=int(s * context),
        rope_parameters={**parameters, "beta_fast": beta_fast, "beta_slow": beta_slow},
    )
    theirs, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config, torch.device("cpu"))
    scaling = RopeScaling("yarn", context, s, alpha=beta_slow, beta=beta_fast)
    torch.testing.assert_close(inverse_frequencies(head_dim, theta, scaling, context), theirs, rtol=1e-6, atol=0)
    # transformers multiplies cos and sin by the attention factor, i.e. the logits by its square.
    assert logit_factor(scaling, context) == pytest.approx(attention_factor**2, rel=1e-12)
    # The paper's equation form stays available and is a different interpolation.
    equation = RopeScaling("yarn", context, s, alpha=beta_slow, beta=beta_fast, yarn_ramp="rotations")
    assert (inverse_frequencies(head_dim, theta, equation, context) - theirs).abs().max() > 1e-4 * theirs.max()


def test_yarn_equation_form_interpolates_by_rotations_over_the_training_context():
    # Rotations over 64 tokens: 64 w / 2 pi = 10.186, 1.0186, 0.10186, 0.010186; with p = 1, q = 32 the ramp is
    # kappa = (r - 1) / 31 = 0.296320, 0.000600, then 0 (clamped), and gamma = (1 - kappa) / s + kappa.
    rotations = {"yarn_ramp": "rotations"}
    assert factors("yarn", 2, **rotations) == pytest.approx([0.6481599, 0.5002999, 0.5, 0.5], rel=1e-5)
    assert factors("yarn", 4, **rotations) == pytest.approx([0.4722399, 0.2504498, 0.25, 0.25], rel=1e-5)
    # The temperature: logits times (0.1 ln s + 1)^2.
    assert logit_factor(RopeScaling("yarn", CONTEXT, 2.0), CONTEXT) == pytest.approx(1.0693147**2, rel=1e-6)
    assert logit_factor(RopeScaling("yarn", CONTEXT, 4.0), CONTEXT) == pytest.approx(1.1386294**2, rel=1e-6)
    assert logit_factor(RopeScaling("ntk", CONTEXT, 4.0), CONTEXT) == 1.0
    # A wider ramp keeps more frequencies interpolated: p = 0, q = 128 gives kappa_0 = 10.186 / 128.
    wide = RopeScaling("yarn", CONTEXT, 2.0, alpha=0.0, beta=128.0, yarn_ramp="rotations")
    assert frequency_factors(wide, HEAD_DIM, THETA, CONTEXT)[0].item() == pytest.approx(0.5 + 10.185916 / 256)


def test_dynamic_ntk_follows_the_input_length_and_every_method_is_the_identity_at_s_1():
    dynamic = RopeScaling("dynamic_ntk", CONTEXT)
    assert frequency_factors(dynamic, HEAD_DIM, THETA, 4 * CONTEXT).tolist() == pytest.approx(factors("ntk", 4))
    assert frequency_factors(dynamic, HEAD_DIM, THETA, CONTEXT // 2).tolist() == [1.0] * 4
    for method in ("pi", "ntk", "yarn"):
        assert factors(method, 1) == pytest.approx([1.0] * 4)
    assert inverse_frequencies(HEAD_DIM, THETA, None, CONTEXT).tolist() == pytest.approx(BASE)


def test_position_interpolation_in_the_model_equals_halved_positions():
    model = tiny_model()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(16)[None]
    with torch.no_grad():
        plain = model(ids, positions)
        model.rope_scaling = RopeScaling("pi", 8, 2.0)
        interpolated = model(ids, 2 * positions)
        model.rope_scaling = None
        far = model(ids, 2 * positions)
    torch.testing.assert_close(interpolated, plain, atol=1e-5, rtol=1e-5)
    assert (far - plain).abs().max() > 1e-3


def test_yarn_temperature_acts_on_the_rope_layers_only():
    """A mixed model under YaRN equals the same model with no temperature whose RoPE layers' q projections are
    scaled by the temperature instead (RoPE is linear, and there is no QK-norm): the NoPE layers keep their logits."""
    model = tiny_model(num_layers=4, no_rope_layers=[0, 1, 0, 1])
    ids = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(0))
    scaling = RopeScaling("yarn", 8, 4.0)
    with torch.no_grad():
        model.rope_scaling = scaling
        with_temperature = model(ids)
        model.rope_scaling = RopeScaling("yarn", 8, 4.0, temperature_coef=0.0)
        for layer in model.layers:
            if layer.attn.use_rope:
                layer.attn.q_proj.weight *= logit_factor(scaling, 32)
        in_rope_layers = model(ids)
    torch.testing.assert_close(with_temperature, in_rope_layers, atol=1e-5, rtol=1e-5)
