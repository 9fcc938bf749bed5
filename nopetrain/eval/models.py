"""Loading a model to evaluate: one of our checkpoints or a local Hugging Face folder, with its tokenizer, its
training context and any logit scale fitted for it before."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nopetrain.checkpoint import CHECKSUMS, find_checkpoint, read_checkpoint, read_state
from nopetrain.config import ConfigError, ModelConfig
from nopetrain.data_pipelines.encoders import Encoder, describe, load, sha256_file
from nopetrain.data_pipelines.errors import DataError as TokenizerError
from nopetrain.eval import logit_scale
from nopetrain.hf import folder_model_config, model_from_hf
from nopetrain.model import Transformer


@dataclass
class LoadedModel:
    name: str
    path: str
    model: Transformer
    tokenizer: Encoder
    tokenizer_path: Path
    eos_id: int
    train_context: int
    # Where the fitted logit scale is stored: <checkpoint>/logit_scale.json.
    scale_file: Path
    # The checkpoint's training step and the sha256 of its checksums.json (None for a Hugging Face folder): with
    # `path`, which weights these are, also when a run is trained again in place to the same step.
    step: int | None = None
    checksums_sha256: str | None = None

    @property
    def identity(self) -> dict[str, Any]:
        # The context sets every length a unit is scored at, so a unit computed at another one is not reused.
        identity = {"checkpoint": self.path, "step": self.step, "checksums_sha256": self.checksums_sha256}
        return identity | {"train_context": self.train_context}


def _tokenizer(path: Path, source: str) -> tuple[Encoder, int]:
    try:
        info = describe(str(path))
        return load(info), info.eos_id
    except TokenizerError as err:
        raise ConfigError(f"{source}: {err}") from None


def trained_context(run_config: dict) -> int:
    """The length the run ended at: its last phase's seq_len, which is the run's where that phase sets none (an earlier
    short phase does not make the context short)."""
    phases = run_config.get("curriculum", {}).get("phases", [])
    return (phases[-1].get("seq_len") if phases else None) or run_config["seq_len"]


def _load_ours(name: str, path: Path) -> LoadedModel:
    ckpt_dir = find_checkpoint(path)
    ckpt = read_checkpoint(ckpt_dir)
    record = ckpt.state.get("tokenizer")
    if record is None:
        raise ConfigError(f"{ckpt_dir}: the run has no tokenizer (trained on synthetic data?); nothing to evaluate")
    tokenizer_path = ckpt_dir.parent.parent / record
    tokenizer, eos_id = _tokenizer(tokenizer_path, str(ckpt_dir))
    model = Transformer(ckpt.model_config)
    model.load_state_dict(ckpt.weights, strict=True)
    context = trained_context(ckpt.state["config"])
    return LoadedModel(
        name,
        str(ckpt_dir),
        model,
        tokenizer,
        tokenizer_path,
        eos_id,
        context,
        ckpt_dir / logit_scale.FILE,
        ckpt.state["step"],
        sha256_file(ckpt_dir / CHECKSUMS) if (ckpt_dir / CHECKSUMS).is_file() else None,
    )


def _load_hf(name: str, folder: Path) -> LoadedModel:
    model = model_from_hf(folder)
    tokenizer_path = next((folder / f for f in ("tokenizer.json", "tokenizer.model") if (folder / f).is_file()), None)
    if tokenizer_path is None:
        raise ConfigError(f"{folder}: no tokenizer.json or tokenizer.model")
    tokenizer, eos_id = _tokenizer(tokenizer_path, str(folder))
    context = json.loads((folder / "config.json").read_text()).get("max_position_embeddings")
    if not context:
        raise ConfigError(f"{folder}/config.json: no max_position_embeddings; set train_context")
    return LoadedModel(
        name, str(folder), model, tokenizer, tokenizer_path, eos_id, int(context), folder / logit_scale.FILE
    )


def architecture(spec: str) -> ModelConfig:
    """The model config of what `spec` names (as for `load_model`), read without its weights: enough to plan which
    methods an evaluation runs before loading any model."""
    hf_folder = spec.removeprefix("hf:")
    if hf_folder != spec:
        return folder_model_config(Path(hf_folder))
    return read_state(find_checkpoint(Path(spec)))[1]


def load_model(name: str, spec: str, train_context: int | None, device: torch.device) -> LoadedModel:
    """The model `spec` names (runs/NAME, runs/NAME/checkpoints/step_N or hf:/folder) in fp32 eval mode on
    `device`, with the stored logit scale applied; `train_context` overrides the one the model records."""
    hf_folder = spec.removeprefix("hf:")
    loaded = _load_hf(name, Path(hf_folder)) if hf_folder != spec else _load_ours(name, Path(spec))
    if train_context is not None:
        loaded.train_context = train_context
    stored = logit_scale.read(loaded.scale_file)
    if stored is not None:
        apply_logit_scale(loaded.model.config, stored.coef, stored.train_context)
    loaded.model.to(device).eval()
    return loaded


def apply_logit_scale(cfg: ModelConfig, coef: float, train_context: int) -> None:
    cfg.logit_scale_coef, cfg.train_context = coef, train_context
