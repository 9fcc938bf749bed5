"""Load a Hugging Face Llama or SmolLM3 checkpoint from a local folder into our Transformer.

Only what our model computes exactly is accepted: a config that would make it silently differ from Hugging Face
(biases, RoPE scaling, another activation, SmolLM3's sliding window) is refused with a one-line ConfigError naming
the config.json and the key. Needs `safetensors` (installed with transformers), not transformers itself.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nopetrain.config import ConfigError, ModelConfig, TrainConfig, validate_model
from nopetrain.model import Transformer


@dataclass(frozen=True)
class Architecture:
    """What one Hugging Face model_type needs: its class name and the defaults its config class fills in for keys
    a config.json leaves out (they differ per model: SmolLM3 ties embeddings and has 4 kv heads by default)."""

    name: str
    defaults: dict[str, Any] = field(default_factory=dict)
    # SmolLM3's no_rope_layers / no_rope_layer_interval cadence keys.
    nope_layers: bool = False
    # Qwen2: q/k/v projections always carry biases (its config has no key for them).
    qkv_bias: bool = False


# Keyed by config.json's model_type. A new family (e.g. Qwen2, with q/k/v biases) is a new row here plus whatever
# our model needs for it.
ARCHITECTURES = {
    "llama": Architecture(
        "LlamaForCausalLM",
        {"rope_theta": 10000.0, "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "num_key_value_heads": None},
    ),
    "smollm3": Architecture(
        "SmolLM3ForCausalLM",
        {
            "rope_theta": 2e6,
            "tie_word_embeddings": True,
            "rms_norm_eps": 1e-6,
            "num_key_value_heads": 4,
            "no_rope_layer_interval": 4,
        },
        nope_layers=True,
    ),
    "qwen2": Architecture(
        "Qwen2ForCausalLM",
        {"rope_theta": 10000.0, "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "num_key_value_heads": None},
        qkv_bias=True,
    ),
}


def _rope_theta(hf: dict[str, Any], source: str) -> float:
    """rope_theta from a default-type rope_parameters (transformers 5.x) or the older top-level keys."""
    # transformers lets a legacy rope_scaling dict replace rope_parameters, so check both.
    for key in ("rope_scaling", "rope_parameters"):
        rope = hf.get(key)
        if not rope:
            continue
        if not isinstance(rope, dict) or any(isinstance(value, dict) for value in rope.values()):
            raise ConfigError(f"{source}: {key}={rope!r} is not a single RoPE dict; only default RoPE is supported")
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise ConfigError(f"{source}: {key} has rope_type={kind!r}; only default (unscaled) RoPE is supported")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConfigError(f"{source}: {key}.partial_rotary_factor={rope['partial_rotary_factor']} is unsupported")
        if "rope_theta" in rope:
            return float(rope["rope_theta"])
    if hf.get("partial_rotary_factor", 1.0) not in (None, 1.0):
        raise ConfigError(f"{source}: partial_rotary_factor={hf['partial_rotary_factor']} is unsupported")
    return float(hf["rope_theta"])


def model_config_from_hf(
    hf_config: dict[str, Any], name: str = "hf", *, source: str | Path = "config.json"
) -> ModelConfig:
    """Our ModelConfig for a Hugging Face config.json dict; `source` names the file in error messages."""
    model_type = hf_config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ConfigError(f"{source}: model_type={model_type!r} is not one of {sorted(ARCHITECTURES)}")
    arch = ARCHITECTURES[model_type]
    if hf_config.get("architectures") not in (None, [arch.name]):
        raise ConfigError(f"{source}: architectures={hf_config['architectures']} must be [{arch.name!r}]")
    hf = {**arch.defaults, **hf_config}
    for key in ("attention_bias", "mlp_bias", "use_sliding_window"):
        # Our projections have no biases; HF SmolLM3 windows the NoPE layers, ours window the RoPE layers.
        if hf.get(key):
            raise ConfigError(f"{source}: {key}={hf[key]} is unsupported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: hidden_act={hf['hidden_act']!r} is unsupported; our MLP is SiLU-gated")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in hf:
            raise ConfigError(f"{source}: missing key {key}")

    num_layers, num_heads = hf["num_hidden_layers"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    no_rope_layers = None
    if arch.nope_layers:
        no_rope_layers = hf.get("no_rope_layers")
        if no_rope_layers is None:
            interval = hf["no_rope_layer_interval"]
            no_rope_layers = [int((i + 1) % interval != 0) for i in range(num_layers)]
        # HF allows a list longer than the model and reads the first num_hidden_layers entries.
        no_rope_layers = list(no_rope_layers[:num_layers])
    cfg = ModelConfig(
        name=name,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=hf["num_key_value_heads"] or num_heads,
        head_dim=head_dim if head_dim and head_dim != hf["hidden_size"] // num_heads else None,
        tie_embeddings=bool(hf["tie_word_embeddings"]),
        qkv_bias=arch.qkv_bias,
        rope_theta=_rope_theta(hf, str(source)),
        no_rope_layers=no_rope_layers,
        norm_eps=float(hf["rms_norm_eps"]),
    )
    try:
        validate_model(cfg)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    return cfg


# Hugging Face parameter names -> ours; layer names are matched after the `model.layers.{i}.` prefix.
_TOP_LEVEL = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_IN_LAYER = {
    **{f"self_attn.{p}_proj.weight": f"attn.{p}_proj.weight" for p in "qkvo"},
    **{f"self_attn.{p}_proj.bias": f"attn.{p}_proj.bias" for p in "qkv"},
    **{f"mlp.{p}_proj.weight": f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")},
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
}
_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")
# Old Llama checkpoints stored RoPE frequency buffers; they are recomputed, so they carry no weights.
_IGNORED = re.compile(r".*\.rotary_emb\.inv_freq")


def _hf_key(key: str) -> str:
    """The Hugging Face name of our parameter `key` (for error messages)."""
    top_level = {ours: hf for hf, ours in _TOP_LEVEL.items()}
    if key in top_level:
        return top_level[key]
    _, layer, rest = key.split(".", 2)
    return f"model.layers.{layer}." + next(hf for hf, ours in _IN_LAYER.items() if ours == rest)


def _our_key(hf_key: str) -> str | None:
    if hf_key in _TOP_LEVEL:
        return _TOP_LEVEL[hf_key]
    match = _LAYER_KEY.fullmatch(hf_key)
    if match and match[2] in _IN_LAYER:
        return f"layers.{match[1]}.{_IN_LAYER[match[2]]}"
    return None


def _weight_files(folder: Path) -> tuple[Path, list[Path]]:
    """The file to name in errors and the weight files to read, in Hugging Face's order of preference."""
    for name in (
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
    ):
        path = folder / name
        if path.is_file():
            if name.endswith(".index.json"):
                shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
                return path, [folder / shard for shard in shards]
            return path, [path]
    raise ConfigError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _read(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def folder_model_config(folder: str | Path, name: str = "hf") -> ModelConfig:
    """The ModelConfig of a local Hugging Face checkpoint folder (its config.json)."""
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: not found")
    return model_config_from_hf(json.loads(path.read_text()), name, source=path)


def load_hf_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The folder's weights under our parameter names, checked against the model its config.json describes."""
    folder = Path(path)
    cfg = folder_model_config(folder)
    with torch.device("meta"):
        expected = Transformer(cfg).state_dict()
    index, files = _weight_files(folder)
    state: dict[str, torch.Tensor] = {}
    for file in files:
        for hf_key, tensor in _read(file).items():
            if _IGNORED.fullmatch(hf_key) or (cfg.tie_embeddings and hf_key == "lm_head.weight"):
                continue  # a tied checkpoint may still store the head; HF uses the embedding for it
            key = _our_key(hf_key)
            if key not in expected:
                raise ConfigError(f"{file}: unknown key {hf_key}")
            if tensor.shape != expected[key].shape:
                raise ConfigError(
                    f"{file}: {hf_key} has shape {list(tensor.shape)}, expected {list(expected[key].shape)}"
                )
            state[key] = tensor
    if cfg.tie_embeddings and "embed.weight" in state:
        # Our lm_head.weight is the embedding's Parameter, so both keys load from the same tensor.
        state["lm_head.weight"] = state["embed.weight"]
    for key in expected:
        if key not in state:
            raise ConfigError(f"{index}: missing key {_hf_key(key)}")
    return state


def model_from_hf(path: str | Path, dtype: torch.dtype = torch.float32) -> Transformer:
    """Our Transformer with the weights of the local Hugging Face checkpoint folder `path`."""
    folder = Path(path)
    model = Transformer(folder_model_config(folder, name=folder.name)).to(dtype)
    model.load_state_dict(load_hf_state_dict(folder), strict=True)
    return model


def pretrained_model(cfg: TrainConfig) -> str | None:
    """The local Hugging Face folder named by init_from; its config.json replaces the model's shape in `cfg`."""
    if cfg.init_from is None:
        return None
    if not cfg.init_from.startswith("hf:"):
        raise ConfigError(f"init_from={cfg.init_from!r} must be hf:/path/to/local/folder")
    folder = cfg.init_from.removeprefix("hf:")
    try:
        shape = folder_model_config(folder, name=Path(folder).name)
    except ConfigError as err:
        raise ConfigError(f"init_from={cfg.init_from}: {err}") from None
    cfg.model = dataclasses.replace(shape, attn_logit_scale=cfg.model.attn_logit_scale)
    return folder
