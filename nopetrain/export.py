"""Export a training checkpoint as a Hugging Face model folder.

    nopetrain-export --checkpoint RUN_DIR|RUN/checkpoints/step_N --output DIR [--dtype float32|bfloat16]

A run directory exports its newest complete checkpoint; step_N may be written unpadded (step_1000).

The fp32 weights are gathered from any ZeRO stage (DeepSpeed's offline zero_to_fp32, no process group needed) and
checked by loading them into our Transformer. The model is the one the checkpoint's `model_config` describes, i.e.
as it is at that step (after a DroPE switch: all layers NoPE, QK-norm as switched on). Two formats:

- Plain SmolLM3 (`SmolLM3ForCausalLM`), when no QK-norm is in use and `attn_logit_scale == 1`. Loads with stock
  transformers: `AutoModelForCausalLM.from_pretrained(DIR)`. `no_rope_layers` holds our RoPE/NoPE cadence (1 = RoPE);
  a sliding window is written as explicit `layer_types` on the RoPE layers (SmolLM3's own default would window the
  NoPE layers instead).
- SmolLM3 plus shipped modeling code (`model_type: nopetrain`), when QK-norm is in use or the logit scale is not 1
  (including a length-dependent one fitted by `nopetrain-eval`, read from `logit_scale.json` beside the
  checkpoint).
  configuration_nopetrain.py and modeling_nopetrain.py (from nopetrain/hf_remote/) are copied into DIR and named in
  config.json's `auto_map`: `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`. Stock transformers
  refuses the folder without that flag rather than loading it as SmolLM3 without the QK-norm.

The run's sentencepiece tokenizer travels along: tokenizer.json (converted, so no sentencepiece is needed to use it)
and tokenizer_config.json for `AutoTokenizer.from_pretrained(DIR)`, plus the .model file itself; no BOS is added, as
in training. It gives sentencepiece's ids except where two segmentations score exactly the same (runs like "*****"):
sentencepiece adds scores in float32, tokenizers in float64, so rounding breaks those ties differently. A checkpoint
without a tokenizer is exported without one (said on stderr).

Everything is written into a hidden folder beside DIR and renamed at the end, so a failure leaves no partial DIR.
Errors are one line, `nopetrain-export: error: PATH: ...`, with exit code 2. The exports target transformers 5.x
(`rope_parameters`; the shipped code subclasses its SmolLM3 classes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from nopetrain.checkpoint import TRAINER_STATE, CheckpointError, find_checkpoint, read_checkpoint
from nopetrain.config import ConfigError, ModelConfig
from nopetrain.eval import logit_scale
from nopetrain.exits import error_line
from nopetrain.hf import _IN_LAYER, _TOP_LEVEL

REMOTE_CODE = Path(__file__).parent / "hf_remote"
REMOTE_FILES = ("configuration_nopetrain.py", "modeling_nopetrain.py")
AUTO_MAP = {
    "AutoConfig": "configuration_nopetrain.NopetrainConfig",
    "AutoModelForCausalLM": "modeling_nopetrain.NopetrainForCausalLM",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# Our parameter names -> Hugging Face's: hf.py's tables reversed, plus the QK-norm gains under the names Qwen3 and
# OLMo2 use for the same per-head norm.
_TO_HF_TOP_LEVEL = {ours: hf for hf, ours in _TOP_LEVEL.items()}
_TO_HF_IN_LAYER = {ours: hf for hf, ours in _IN_LAYER.items()} | {
    "attn.q_norm_weight": "self_attn.q_norm.weight",
    "attn.k_norm_weight": "self_attn.k_norm.weight",
}


class ExportError(Exception):
    """A checkpoint that cannot be exported; the message names the path."""


def uses_remote_code(cfg: ModelConfig) -> bool:
    """Whether stock SmolLM3 cannot compute this model (QK-norm in use, a logit scale, or q/k/v-only biases)."""
    return cfg.qk_norm != "none" or cfg.attn_logit_scale != 1.0 or cfg.logit_scale_coef != 0.0 or cfg.qkv_bias


def hf_state_dict(cfg: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Weights under Hugging Face names, as separate tensors (safetensors refuses views of one buffer)."""
    out = {}
    for key, tensor in weights.items():
        if key == "lm_head.weight" and cfg.tie_embeddings:
            continue  # transformers ties it to the embedding
        if key in _TO_HF_TOP_LEVEL:
            name = _TO_HF_TOP_LEVEL[key]
        else:
            _, layer, rest = key.split(".", 2)
            name = f"model.layers.{layer}.{_TO_HF_IN_LAYER[rest]}"
        out[name] = tensor.to(dtype=dtype, copy=True)
    return out


def hf_config(
    cfg: ModelConfig, run_config: dict[str, Any], special_ids: dict[str, int | None], dtype: str
) -> dict[str, Any]:
    """config.json for SmolLM3 (or our remote-code subclass of it)."""
    rope_layers = cfg.rope_layers()
    # Our window belongs to the RoPE layers; NoPE layers (all layers after DroPE) stay global.
    windowed = [cfg.sliding_window is not None and use_rope for use_rope in rope_layers]
    phases = run_config.get("curriculum", {}).get("phases", [])
    trained_length = max([run_config["seq_len"], *(phase.get("seq_len") or 0 for phase in phases)])
    config = {
        "architectures": ["SmolLM3ForCausalLM"],
        "model_type": "smollm3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "no_rope_layers": [int(use_rope) for use_rope in rope_layers],
        # Informational for default RoPE (the longest context trained on); NoPE layers have no limit.
        "max_position_embeddings": trained_length,
        "use_sliding_window": any(windowed),
        "sliding_window": cfg.sliding_window if any(windowed) else None,
        "layer_types": ["sliding_attention" if window else "full_attention" for window in windowed],
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        **special_ids,
        "dtype": dtype,
    }
    if uses_remote_code(cfg):
        config.update(
            architectures=["NopetrainForCausalLM"],
            model_type="nopetrain",
            auto_map=AUTO_MAP,
            qk_norm=cfg.qk_norm,
            attn_logit_scale=cfg.attn_logit_scale,
            logit_scale_coef=cfg.logit_scale_coef,
            train_context=cfg.train_context,
            qkv_bias=cfg.qkv_bias,
        )
    return config


def write_tokenizer(model_file: Path, folder: Path) -> dict[str, int | None]:
    """tokenizer.json + tokenizer_config.json (+ the sentencepiece model itself) for AutoTokenizer; returns the
    special token ids for config.json."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as err:
        raise ExportError(f"{model_file}: converting the tokenizer needs protobuf ({error_line(err)})") from None
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import Unigram

    try:
        proto = sentencepiece_model_pb2.ModelProto.FromString(model_file.read_bytes())
    except Exception as err:  # protobuf's DecodeError, or an OSError
        raise ExportError(f"{model_file}: not a sentencepiece model ({error_line(err)})") from None
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    # What nopetrain's tokenizer trainer writes; anything else would need more than this converter reproduces.
    unsupported = {
        "model_type (only unigram)": spec.model_type != spec.UNIGRAM,
        "a normalization rule (only identity)": bool(norm.precompiled_charsmap),
        "remove_extra_whitespaces": norm.remove_extra_whitespaces,
        "treat_whitespace_as_suffix": spec.treat_whitespace_as_suffix,
        "escape_whitespaces off": not norm.escape_whitespaces,
    }
    if any(unsupported.values()):
        found = ", ".join(name for name, bad in unsupported.items() if bad)
        raise ExportError(f"{model_file}: cannot convert this sentencepiece model to tokenizer.json ({found})")

    tokenizer = Tokenizer(
        Unigram([(p.piece, p.score) for p in proto.pieces], unk_id=spec.unk_id, byte_fallback=spec.byte_fallback)
    )
    # sentencepiece's whitespace handling: "▁" for every space, plus one in front of the text (add_dummy_prefix).
    prefix = [normalizers.Prepend("▁")] if norm.add_dummy_prefix else []
    tokenizer.normalizer = normalizers.Sequence([*prefix, normalizers.Replace(" ", "▁")])
    strip = [decoders.Strip(" ", 1, 0)] if norm.add_dummy_prefix else []
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
    )
    # unk and control pieces (<s>, </s>, <pad>) are special tokens; user-defined symbols always match whole.
    piece_type = sentencepiece_model_pb2.ModelProto.SentencePiece
    special = (piece_type.UNKNOWN, piece_type.CONTROL)
    tokenizer.add_special_tokens(
        [AddedToken(p.piece, special=True, normalized=False) for p in proto.pieces if p.type in special]
    )
    tokenizer.add_tokens(
        [AddedToken(p.piece, normalized=False) for p in proto.pieces if p.type == piece_type.USER_DEFINED]
    )
    tokenizer.save(str(folder / "tokenizer.json"))
    shutil.copyfile(model_file, folder / "tokenizer.model")

    ids = {"unk": spec.unk_id, "bos": spec.bos_id, "eos": spec.eos_id, "pad": spec.pad_id}
    tokens = {f"{name}_token": proto.pieces[i].piece for name, i in ids.items() if i >= 0}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **tokens,
        # Training documents are followed by EOS and never preceded by BOS.
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return {f"{name}_token_id": (i if i >= 0 else None) for name, i in ids.items() if name != "unk"}


def export(checkpoint: Path, output: Path, dtype: str = "float32") -> str:
    """Writes the Hugging Face folder `output` for `checkpoint`; returns a one-line summary."""
    from safetensors.torch import save_file

    if output.exists():
        raise ExportError(f"{output}: already exists; remove it or choose another --output")
    try:
        checkpoint = find_checkpoint(checkpoint)
        ckpt = read_checkpoint(checkpoint)
    except CheckpointError as err:
        raise ExportError(str(err)) from None
    cfg = ckpt.model_config
    try:
        fitted = logit_scale.read(checkpoint / logit_scale.FILE)
    except ConfigError as err:
        raise ExportError(str(err)) from None
    if fitted is not None:
        # DroPE's logit scale fitted by `nopetrain-eval` travels with the weights.
        cfg.logit_scale_coef, cfg.train_context = fitted.coef, fitted.train_context
    output.parent.mkdir(parents=True, exist_ok=True)
    # Beside the output, so the final rename stays on one filesystem; mkdir (not mkdtemp) keeps the umask's mode.
    staging = output.with_name(f".{output.name}.partial-{os.getpid()}")
    staging.mkdir()
    try:
        special_ids: dict[str, int | None] = dict.fromkeys(("bos_token_id", "eos_token_id", "pad_token_id"))
        tokenizer = ckpt.state.get("tokenizer")
        if tokenizer is None:
            print(f"nopetrain-export: {checkpoint} has no tokenizer; exporting the model without one", file=sys.stderr)
        else:
            model_file = checkpoint.parent.parent / tokenizer
            if not model_file.is_file():
                raise ExportError(f"{model_file}: tokenizer named by {checkpoint / TRAINER_STATE} is missing")
            special_ids = write_tokenizer(model_file, staging)
        config = hf_config(cfg, ckpt.state["config"], special_ids, dtype)
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if uses_remote_code(cfg):
            for name in REMOTE_FILES:
                shutil.copyfile(REMOTE_CODE / name, staging / name)
        save_file(hf_state_dict(cfg, ckpt.weights, DTYPES[dtype]), staging / "model.safetensors", {"format": "pt"})
        os.rename(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    kind = "SmolLM3 + remote code (trust_remote_code=True)" if uses_remote_code(cfg) else "SmolLM3"
    return f"exported step {ckpt.state['step']} of {checkpoint} to {output} as {kind}, {dtype}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nopetrain-export", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint",
        required=True,
        type=Path,
        help="a run directory (its newest checkpoint) or RUN/checkpoints/step_N",
    )
    parser.add_argument("--output", required=True, type=Path, help="folder to create")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    args = parser.parse_args(argv)
    try:
        print(export(args.checkpoint, args.output, args.dtype))
    except ExportError as err:
        print(f"nopetrain-export: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
