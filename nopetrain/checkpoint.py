"""Atomic DeepSpeed checkpoints with the trainer's own state.

Layout under `<run.dir>/checkpoints/`:
  step_00000100/             DeepSpeed's files (model and ZeRO optimizer shards) plus
    trainer_state.json       step, tokens seen, W&B run id, resolved config (rank 0)
    rank_00000.pt ...        each rank's RNG states and data-stream position
  latest                     the newest complete tag, for tools that follow DeepSpeed's convention

Every rank writes into `.incomplete-step_N/`; only after all ranks are done does rank 0 rename it to `step_N`,
so a crash mid-save leaves the previous checkpoints untouched and `resume=auto` never sees a partial one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.runtime.engine import DeepSpeedEngine

from nopetrain.config import ConfigError

TAG_PATTERN = re.compile(r"^step_(\d{8})$")
INCOMPLETE_PREFIX = ".incomplete-"
TRAINER_STATE = "trainer_state.json"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name) and (p / TRAINER_STATE).exists()]
    return sorted(found, key=lambda p: p.name)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(
    engine: DeepSpeedEngine,
    run_dir: str | Path,
    step: int,
    trainer_state: dict[str, Any],
    rank_state: dict[str, Any],
    keep: int,
) -> Path:
    """Writes checkpoint `step` from every rank, publishes it atomically, and prunes all but the newest `keep`."""
    root = checkpoint_root(run_dir)
    tag = tag_for(step)
    staging_tag = INCOMPLETE_PREFIX + tag
    staging = root / staging_tag
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        # Left behind by a save that crashed: never complete, safe to drop.
        for stale in root.glob(INCOMPLETE_PREFIX + "*"):
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=staging_tag, save_latest=False)
    torch.save(rank_state, staging / f"rank_{rank:05d}.pt")
    dist.barrier()
    final = root / tag
    if rank == 0:
        (staging / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2, sort_keys=True))
        if final.exists():
            # A resumed run that passes a step it had saved before replaces that checkpoint.
            shutil.rmtree(final)
        os.replace(staging, final)
        _write_text_atomic(root / "latest", tag)
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def resolve_resume(resume: str, run_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: `auto` -> newest complete one in run_dir (or None), `none` -> None (refused
    when run_dir already holds checkpoints, so nothing is overwritten), else a checkpoint directory path."""
    root = checkpoint_root(run_dir)
    if resume == "auto":
        found = complete_checkpoints(root)
        return found[-1] if found else None
    if resume == "none":
        if complete_checkpoints(root):
            raise ConfigError(
                f"checkpoint.resume=none but {root} already holds checkpoints; "
                "use checkpoint.resume=auto to continue or choose another run.name"
            )
        return None
    path = Path(resume)
    if not (path / TRAINER_STATE).is_file():
        raise ConfigError(f"checkpoint.resume={resume}: not a complete nopetrain checkpoint (no {TRAINER_STATE})")
    return path


UNIVERSAL = "universal"


def convert_to_universal(path: Path) -> Path:
    """DeepSpeed's universal form of checkpoint `path` (written once, beside its shards, by rank 0), which a run with
    another number of processes can load: ZeRO's own shards hold one partition per rank of the saving run."""
    target = path / UNIVERSAL
    if dist.get_rank() == 0 and not (target / "zero").is_dir():
        from argparse import Namespace

        from deepspeed.checkpoint import ds_to_universal

        staging = path / (UNIVERSAL + ".incomplete")
        shutil.rmtree(staging, ignore_errors=True)
        ds_to_universal.main(
            Namespace(
                input_folder=str(path),
                output_folder=str(staging),
                num_extract_workers=1,
                num_merge_workers=1,
                keep_temp_folder=False,
                strict=True,
                inject_missing_state=True,
            )
        )
        os.replace(staging, target)
    dist.barrier()
    return target


def read_rank_states(path: Path) -> list[dict[str, Any]]:
    """Every rank's saved state, for re-splitting the data streams over a different layout."""
    return [torch.load(file, weights_only=False) for file in sorted(path.glob("rank_*.pt"))]


def read_trainer_state(path: Path) -> dict[str, Any]:
    return json.loads((path / TRAINER_STATE).read_text())


def load(engine: DeepSpeedEngine, path: Path, universal: bool) -> dict[str, Any] | None:
    """Loads model and optimizer state into the engine (from the universal form when the number of processes
    changed); returns this rank's RNG and data-stream state, None if the saving run had no such rank."""
    load_dir, tag = (path, UNIVERSAL) if universal else (path.parent, path.name)
    loaded, _ = engine.load_checkpoint(str(load_dir), tag=tag)
    if loaded is None:
        raise ConfigError(f"checkpoint {path}: DeepSpeed found no model states to load")
    rank_file = path / f"rank_{dist.get_rank():05d}.pt"
    if not rank_file.exists():
        if universal:
            return None
        raise ConfigError(f"checkpoint {path}: {rank_file.name} is missing")
    return torch.load(rank_file, weights_only=False)
