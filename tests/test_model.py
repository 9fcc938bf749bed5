"""Model semantics: the NoPE cadence, the prefix-permutation property, DroPE, sliding windows, presets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from nopetrain.config import ActivationCheckpointingConfig, ModelConfig, register_configs
from nopetrain.data import batch_from_chunks
from nopetrain.drope import drop_rope
from nopetrain.model import KVCache, Transformer, count_parameters
from nopetrain.rope import rope_tables

from .helpers import REPO


def tiny(**overrides) -> ModelConfig:
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=8, num_heads=4, num_kv_heads=2)
    return ModelConfig(**{**base, **overrides})


def build(cfg: ModelConfig) -> Transformer:
    torch.manual_seed(0)
    return Transformer(cfg).eval()


def prefix_permutation_changes(fn, x: torch.Tensor, i: int) -> bool:
    """Whether output position i of fn changes when the inputs before i are permuted (batch dim 0, seq dim 1)."""
    perm = torch.cat([torch.randperm(i, generator=torch.Generator().manual_seed(1)), torch.arange(i, x.shape[1])])
    assert not torch.equal(perm[:i], torch.arange(i))
    with torch.no_grad():
        return not torch.allclose(fn(x)[:, i], fn(x[:, perm])[:, i], atol=1e-5, rtol=1e-5)


def attention_of(layer):
    """The layer's attention as a function of its input (batch, seq, hidden), positions 0..seq-1, with its RoPE and
    QK-norm flags read as Transformer.forward reads them."""
    attn = layer.attn

    def fn(x):
        rope = rope_tables(torch.arange(x.shape[1])[None], attn.head_dim, 10000.0) if attn.use_rope else None
        return attn(x, rope, attn.qk_norm, 1.0)

    return fn


def test_interval_four_on_eight_layers_puts_nope_at_3_and_7():
    cfg = tiny(no_rope_layer_interval=4)
    assert [i for i, rope in enumerate(cfg.rope_layers()) if not rope] == [3, 7]
    model = build(cfg)
    assert [i for i, layer in enumerate(model.layers) if not layer.attn.use_rope] == [3, 7]


def test_explicit_list_and_interval_zero():
    assert tiny(no_rope_layers=[1, 0, 1, 1, 0, 1, 1, 1]).rope_layers() == [bool(f) for f in [1, 0, 1, 1, 0, 1, 1, 1]]
    assert tiny(no_rope_layer_interval=0).rope_layers() == [True] * 8
    assert tiny().rope_layers() == [True] * 8


def test_nope_layers_are_invariant_to_prefix_permutation_and_rope_layers_are_not():
    model = build(tiny(no_rope_layer_interval=4))
    x = torch.randn(2, 12, 32)
    for index, layer in enumerate(model.layers):
        changes = prefix_permutation_changes(attention_of(layer), x, i=9)
        assert changes == layer.attn.use_rope, f"layer {index}"


@pytest.mark.parametrize("qk_norm", ["none", "qk", "q"])
def test_drope_makes_every_layer_prefix_invariant(qk_norm):
    model = build(tiny(no_rope_layer_interval=4))
    params_before = count_parameters(model)

    new_params = drop_rope(model, qk_norm=qk_norm)

    head_dim, layers = 8, 8
    expected_new = {"none": 0, "q": layers * head_dim, "qk": 2 * layers * head_dim}[qk_norm]
    assert sum(p.numel() for p in new_params) == expected_new
    assert count_parameters(model) == params_before + expected_new
    assert all(torch.equal(p, torch.ones_like(p)) for p in new_params)
    assert model.config.rope_layers() == [False] * layers
    assert model.config.qk_norm == qk_norm
    x = torch.randn(2, 12, 32)
    for index, layer in enumerate(model.layers):
        assert not prefix_permutation_changes(attention_of(layer), x, i=9), f"layer {index}"


def test_drope_with_unit_gains_leaves_logits_unchanged_where_norm_is_identity():
    # Dropping RoPE changes the function, but adding QK-norm must not touch anything else: with qk_norm=none the
    # drop of an all-NoPE model is the identity.
    model = build(tiny(no_rope_layers=[0] * 8))
    tokens = torch.randint(64, (2, 10))
    with torch.no_grad():
        before = model(tokens)
        drop_rope(model, qk_norm="none")
        torch.testing.assert_close(model(tokens), before)


def test_sliding_window_limits_rope_layers_only():
    window = 4
    model = build(tiny(no_rope_layer_interval=2, sliding_window=window))
    x = torch.randn(1, 12, 32)
    i = 10
    far = x.clone()
    far[:, : i - window + 1] = torch.randn(1, i - window + 1, 32)
    for index, layer in enumerate(model.layers):
        fn = attention_of(layer)
        with torch.no_grad():
            unchanged = torch.allclose(fn(x)[:, i], fn(far)[:, i], atol=1e-6)
        assert unchanged == layer.attn.use_rope, f"layer {index}: window applies to RoPE layers only"


def test_logit_scale_sharpens_attention():
    cfg = tiny(attn_logit_scale=1.0)
    model = build(cfg)
    tokens = torch.randint(64, (1, 10))
    with torch.no_grad():
        base = model(tokens)
        model.config.attn_logit_scale = 2.0
        assert not torch.allclose(model(tokens), base)


PUBLISHED_PARAMETERS = {
    "tiny": None,
    "smollm_135m": 134_515_008,
    "smollm_360m": 361_821_120,
    "smollm_1p7b": 1_711_376_384,
    "smollm3_3b": 3_075_098_624,
    "llama2_7b": 6_738_415_616,
}


@pytest.mark.parametrize("preset", sorted(PUBLISHED_PARAMETERS))
def test_preset_parameter_counts_match_published(preset):
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("train", overrides=[f"model={preset}"]))
    with torch.device("meta"):
        model = Transformer(cfg.model)
    if PUBLISHED_PARAMETERS[preset] is not None:
        assert count_parameters(model) == PUBLISHED_PARAMETERS[preset]
    if preset == "smollm3_3b":
        assert [i for i, rope in enumerate(cfg.model.rope_layers()) if not rope] == list(range(3, 36, 4))


@pytest.mark.parametrize("memory_savers", [False, True], ids=["plain", "selective_ac_and_chunked_loss"])
def test_forward_and_loss_compile_as_one_graph(memory_savers):
    """fullgraph=True turns any graph break into an error; the backward then runs AOTAutograd's compiled graph. With
    the memory savers: op-level selective recompute of every block and the loss in chunks of 5 of the 30 tokens."""
    cfg = tiny(num_layers=2, no_rope_layer_interval=2, qk_norm="qk", sliding_window=8)
    torch.manual_seed(0)
    recompute = ActivationCheckpointingConfig("selective" if memory_savers else "none")
    model = Transformer(cfg, activation_checkpointing=recompute, loss_chunk_tokens=5 if memory_savers else 0)
    tokens = torch.randint(64, (2, 16))

    def loss_fn(t):
        return model(t[:, :-1], labels=t[:, 1:])

    compiled_loss = torch.compile(loss_fn, fullgraph=True)(tokens)
    compiled_loss.backward()
    compiled_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eager_loss = loss_fn(tokens)
    eager_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss, atol=1e-5, rtol=1e-5)
    for compiled_grad, p in zip(compiled_grads, model.parameters(), strict=True):
        torch.testing.assert_close(compiled_grad, p.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("window", [None, 5])
def test_packed_documents_give_the_logits_of_separate_runs(window):
    model = build(tiny(no_rope_layer_interval=2, sliding_window=window))
    first, second = torch.randint(64, (1, 7)), torch.randint(64, (1, 9))
    packed = torch.cat([first, second], dim=1)
    chunk = torch.cat([packed, torch.zeros(1, 1, dtype=torch.long)], dim=1).numpy()
    batch = batch_from_chunks(chunk, [np.array([0, 7])], document_masking=True)
    with torch.no_grad():
        together = model(batch.input_ids, batch.position_ids, batch.segments)
        torch.testing.assert_close(together[:, :7], model(first), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(together[:, 7:], model(second), atol=1e-5, rtol=1e-5)
        # Without the mask the second document sees the first: the test can fail.
        unmasked = model(batch.input_ids, batch.position_ids)
        assert not torch.allclose(unmasked[:, 7:], model(second), atol=1e-3)


def test_dormant_qk_norm_gains_change_nothing_until_drope_switches_them_on():
    cfg = tiny(no_rope_layer_interval=4)
    plain = build(cfg)
    torch.manual_seed(0)
    prepared = Transformer(tiny(no_rope_layer_interval=4), extra_qk_norm="qk").eval()
    tokens = torch.randint(64, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(prepared(tokens), plain(tokens))
    assert count_parameters(prepared) == count_parameters(plain) + 2 * 8 * 8
    assert drop_rope(prepared, qk_norm="qk") == []
    assert all(layer.attn.qk_norm == "qk" and not layer.attn.use_rope for layer in prepared.layers)
    drop_rope(plain, qk_norm="qk")
    with torch.no_grad():
        torch.testing.assert_close(prepared(tokens), plain(tokens))


@pytest.mark.parametrize(
    "overrides",
    [{}, {"no_rope_layer_interval": 2, "qk_norm": "qk"}, {"sliding_window": 5}, {"num_kv_heads": 1}],
    ids=["rope", "nope_every_2nd_qk_norm", "window", "mqa"],
)
def test_kv_cache_decoding_gives_the_logits_of_full_recomputation(overrides):
    model = build(tiny(num_layers=3, **overrides))
    ids = torch.randint(0, 64, (2, 14), generator=torch.Generator().manual_seed(0))
    cache = KVCache(len(model.layers))
    with torch.no_grad():
        prefill = model(ids[:, :9], cache=cache)
        assert prefill.shape == (2, 1, 64) and cache.length == 9
        torch.testing.assert_close(prefill[:, -1], model(ids[:, :9])[:, -1], rtol=1e-5, atol=1e-5)
        for end in range(10, 15):
            step = model(ids[:, end - 1 : end], cache=cache)
            torch.testing.assert_close(step[:, -1], model(ids[:, :end])[:, -1], rtol=1e-5, atol=1e-5)


def test_logits_of_the_last_positions_only_equal_those_of_the_full_forward():
    # Teacher-forced NIAH scoring asks for the answer's positions only, sparing the vocabulary projection elsewhere.
    model = build(tiny())
    ids = torch.randint(0, 64, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, last = model(ids), model(ids, last=5)
    assert last.shape == (3, 5, 64)
    torch.testing.assert_close(last, full[:, -5:])
