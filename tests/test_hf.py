"""Loading Hugging Face Llama / SmolLM3 checkpoints: logits match transformers, and unsupported configs are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nopetrain.config import ConfigError
from nopetrain.hf import load_hf_state_dict, model_config_from_hf, model_from_hf

transformers = pytest.importorskip("transformers")

# Tiny shapes; the special token ids must lie inside the vocab or transformers refuses the config.
TINY = dict(
    vocab_size=64,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def hf_model(kind: str, **overrides) -> torch.nn.Module:
    """A random fp32 HF model whose weights are large enough that attention is far from uniform, so a RoPE/NoPE
    mix-up moves the logits well past the tolerance."""
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "smollm3": (transformers.SmolLM3Config, transformers.SmolLM3ForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[kind]
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**TINY, **overrides}, attn_implementation="eager")).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.2)  # non-trivial gains, so a swapped norm would show
            else:
                param.normal_(0.0, 0.15)
    return model


def save(model: torch.nn.Module, folder: Path, **kwargs) -> Path:
    model.save_pretrained(folder, **kwargs)
    return folder


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def logits_pair(hf: torch.nn.Module, ours: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return ours(ids), hf(input_ids=ids).logits


def assert_parity(hf: torch.nn.Module, ours: torch.nn.Module) -> None:
    torch.testing.assert_close(*logits_pair(hf, ours), atol=1e-5, rtol=1e-5)


LLAMA_CASES = {
    "tied": dict(tie_word_embeddings=True),
    "untied": dict(tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    "wide_heads": dict(head_dim=32),
}


@pytest.mark.parametrize("case", LLAMA_CASES)
def test_llama_logits_match_transformers(tmp_path, case):
    hf = hf_model("llama", **LLAMA_CASES[case])
    ours = model_from_hf(save(hf, tmp_path))
    cfg, case_config = ours.config, LLAMA_CASES[case]
    assert (cfg.num_heads, cfg.num_kv_heads) == (4, 2)
    assert cfg.tie_embeddings == case_config.get("tie_word_embeddings", False)
    assert cfg.resolved_head_dim == case_config.get("head_dim", 16)
    assert all(layer.attn.use_rope for layer in ours.layers)
    assert (ours.lm_head.weight is ours.embed.weight) == cfg.tie_embeddings
    assert_parity(hf, ours)


@pytest.mark.parametrize("fmt", ["sharded_safetensors", "pytorch_bin"])
def test_sharded_and_bin_checkpoints_load(tmp_path, fmt):
    hf = hf_model("llama", tie_word_embeddings=False)
    if fmt == "sharded_safetensors":
        save(hf, tmp_path, max_shard_size="20KB")
        assert (tmp_path / "model.safetensors.index.json").is_file()
    else:
        hf.config.save_pretrained(tmp_path)
        torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    assert_parity(hf, model_from_hf(tmp_path))


def test_smollm3_interval_logits_match_transformers(tmp_path):
    hf = hf_model("smollm3", no_rope_layer_interval=2, rope_parameters={"rope_type": "default", "rope_theta": 1000.0})
    folder = save(hf, tmp_path)
    # transformers writes the expanded list too; drop it so the interval path is the one exercised.
    edit_config(folder, no_rope_layers=None, layer_types=None)
    ours = model_from_hf(folder)
    assert [layer.attn.use_rope for layer in ours.layers] == [True, False, True, False]
    assert ours.config.rope_theta == 1000.0
    assert_parity(hf, ours)


def test_smollm3_explicit_list_logits_match_transformers(tmp_path):
    hf = hf_model("smollm3", no_rope_layers=[0, 1, 1, 0], tie_word_embeddings=False)
    ours = model_from_hf(save(hf, tmp_path))
    assert [layer.attn.use_rope for layer in ours.layers] == [False, True, True, False]
    assert_parity(hf, ours)


@pytest.mark.parametrize("layer", [0, 1])
def test_parity_test_fails_when_the_cadence_is_wrong(tmp_path, layer):
    hf = hf_model("smollm3", no_rope_layer_interval=2)
    ours = model_from_hf(save(hf, tmp_path))
    ours.layers[layer].attn.use_rope = not ours.layers[layer].attn.use_rope
    ours_logits, hf_logits = logits_pair(hf, ours)
    assert (ours_logits - hf_logits).abs().max() > 0.1  # far outside the tolerance, not a rounding accident
    with pytest.raises(AssertionError):
        assert_parity(hf, ours)


def llama_config(**changes) -> dict:
    config = transformers.LlamaConfig(**TINY).to_dict()
    config.update({"architectures": ["LlamaForCausalLM"], **changes})
    return config


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        (dict(attention_bias=True), "attention_bias"),
        (dict(mlp_bias=True), "mlp_bias"),
        (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
        (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), "rope_parameters"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(model_type="mistral"), "model_type"),
        (dict(architectures=["LlamaForSequenceClassification"]), "architectures"),
    ],
)
def test_unsupported_llama_configs_are_refused(changes, key):
    with pytest.raises(ConfigError, match=key) as err:
        model_config_from_hf(llama_config(**changes), source="ckpt/config.json")
    assert str(err.value).startswith("ckpt/config.json: ") and "\n" not in str(err.value)


def test_smollm3_sliding_window_is_refused():
    config = transformers.SmolLM3Config(**TINY).to_dict()
    config.update(use_sliding_window=True, sliding_window=8)
    with pytest.raises(ConfigError, match="use_sliding_window"):
        model_config_from_hf(config)


def test_attention_bias_checkpoint_is_refused_naming_its_config(tmp_path):
    folder = save(hf_model("llama", attention_bias=True), tmp_path)
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'config.json'}: attention_bias"):
        model_from_hf(folder)


def test_legacy_top_level_rope_theta_and_missing_kv_heads():
    config = llama_config(rope_theta=5e5)
    del config["rope_parameters"], config["num_key_value_heads"]
    cfg = model_config_from_hf(config)
    assert (cfg.rope_theta, cfg.num_kv_heads, cfg.head_dim) == (5e5, 4, None)


def test_bf16_load_keeps_the_tie(tmp_path):
    ours = model_from_hf(save(hf_model("smollm3"), tmp_path), dtype=torch.bfloat16)
    assert ours.embed.weight.dtype == torch.bfloat16 and ours.lm_head.weight is ours.embed.weight


def test_unknown_and_missing_weights_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = save(hf_model("llama", tie_word_embeddings=False), tmp_path)
    weights = load_file(folder / "model.safetensors")
    save_file({**weights, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}, folder / "model.safetensors")
    with pytest.raises(ConfigError, match=r"model\.safetensors: unknown key model\.layers\.0\.self_attn\.q_proj\.bias"):
        load_hf_state_dict(folder)
    del weights["lm_head.weight"]
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(ConfigError, match=r"missing key lm_head\.weight"):
        load_hf_state_dict(folder)


@pytest.mark.parametrize("tied", [True, False])
def test_qwen2_with_qkv_biases_matches_transformers(tmp_path, tied):
    hf = hf_model("qwen2", tie_word_embeddings=tied)
    ours = model_from_hf(save(hf, tmp_path / "qwen2"))
    assert ours.config.qkv_bias and ours.layers[0].attn.q_proj.bias is not None
    assert ours.layers[0].attn.o_proj.bias is None
    assert_parity(hf, ours)
