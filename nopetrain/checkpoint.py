"""Atomic DeepSpeed checkpoints with the trainer's own state.

Layout under `<run.dir>/checkpoints/`:
  step_00000100/             DeepSpeed's files (model and ZeRO optimizer shards) plus
    trainer_state.json       step, tokens seen, W&B run id, resolved config (rank 0)
    rank_00000.pt ...        each rank's RNG states and data-stream position
    checksums.json           size and sha256 of every file above (rank 0, last)
  latest                     the newest complete tag, for tools that follow DeepSpeed's convention

A resume from a checkpoint older than the newest one is a rewind: refused unless `checkpoint.rewind=true`, which
moves the newer checkpoints into `<run.dir>/rewound/<UTC time>/checkpoints/` (see resume.set_aside_later_steps).
Pruning (`keep`) only removes checkpoints older than the one just saved.

Every rank writes into `.incomplete-step_N/`; only after all ranks are done does rank 0 record the checksums and
rename it to `step_N`, so a crash mid-save leaves the previous checkpoints untouched and `resume=auto` never sees a
partial one. A checkpoint damaged after publishing (a truncated copy, a full disk) fails its checksums: `resume=auto`
skips it with a warning and takes the newest intact one, an explicit `checkpoint.resume=PATH` is refused.

Every file is read with `torch.load(weights_only=True)`, DeepSpeed's own loaders included (`safe_torch_load`): a
checkpoint is data, and loading one must not run code that a crafted pickle brings along.

Outside training (export, evaluation) `read_checkpoint` gives a checkpoint's trainer state, model config and full
fp32 weights from any ZeRO stage, without a process group; `read_state` the first two alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import pickle
import random
import re
import shutil
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from nopetrain.atomic import write_bytes
from nopetrain.config import ConfigError, ModelConfig, validate_model
from nopetrain.exits import ExitError, error_line
from nopetrain.model import Transformer

TAG_PATTERN = re.compile(r"^step_(\d{8})$")
INCOMPLETE_PREFIX = ".incomplete-"
TRAINER_STATE = "trainer_state.json"
CHECKSUMS = "checksums.json"

# What DeepSpeed's ZeRO-1/2/3 model and optimizer states hold besides tensors and plain containers (found by listing
# the globals of real checkpoints): plain classes whose construction runs no code of the file's choosing.
DEEPSPEED_GLOBALS = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]

log = logging.getLogger("nopetrain")


class CheckpointError(ExitError, ValueError):
    """A checkpoint that cannot be used: not one, unreadable, damaged, or a file that would need more than tensors and
    plain data to load. The message names the file or folder; refused (exit 2): retrying cannot fix it."""


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(path: Path) -> int:
    """The step of a checkpoint directory named by tag_for."""
    return int(TAG_PATTERN.match(path.name).group(1))


# What a user types: RUN/checkpoints/step_1000 for the folder step_00001000.
UNPADDED_TAG = re.compile(r"^step_(\d+)$")


def padded(path: Path) -> Path:
    """`RUN/checkpoints/step_N` as the folder is named (step_00000N); any other path as it is."""
    tag = UNPADDED_TAG.match(path.name)
    return path.parent / tag_for(int(tag[1])) if tag else path


def find_checkpoint(path: Path) -> Path:
    """The checkpoint `path` names: a checkpoint folder, `RUN/checkpoints/step_N` with N padded or not, or a run
    directory (its newest complete checkpoint); CheckpointError where it names none."""
    if (padded(path) / TRAINER_STATE).is_file():
        return padded(path)
    found = complete_checkpoints(checkpoint_root(path))
    if not found:
        raise CheckpointError(f"{path}: neither a checkpoint nor a run directory with complete checkpoints")
    return found[-1]


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name) and (p / TRAINER_STATE).exists()]
    return sorted(found, key=lambda p: p.name)


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors, tuples and ints, which a weights-only load reads back."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, keys.tolist(), pos, has_gauss, cached_gaussian),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@contextlib.contextmanager
def safe_torch_load() -> Iterator[None]:
    """Inside, every `torch.load` is weights-only (tensors, containers and DEEPSPEED_GLOBALS), and a file that needs
    anything else raises CheckpointError naming it, before any of its code runs."""
    # DeepSpeed's checkpoint readers (engine, ZeRO optimizers, universal conversion, zero_to_fp32) call torch.load
    # with weights_only=False in some forty places; its pluggable checkpoint engine covers only a few of them.
    unrestricted = torch.load

    def restricted(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        try:
            return unrestricted(f, *args, **kwargs)
        except pickle.UnpicklingError as err:
            # torch's message is a paragraph; its reason is the sentence after "WeightsUnpickler error:".
            reason = re.search(r"WeightsUnpickler error: (.*?)(?: Please use|\n|$)", str(err))
            raise CheckpointError(
                f"{f}: refused to load, it holds more than tensors and plain data "
                f"({reason.group(1).rstrip('.') if reason else str(err).splitlines()[0]})"
            ) from None

    torch.load = restricted
    try:
        with torch.serialization.safe_globals(DEEPSPEED_GLOBALS):
            yield
    finally:
        torch.load = unrestricted


def _sha256(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def write_checksums(folder: Path) -> None:
    """Records size and sha256 of every file under `folder` in its checksums.json."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    record = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (folder / CHECKSUMS).write_text(json.dumps(record, indent=2, sort_keys=True))


def find_damage(path: Path) -> str | None:
    """What is wrong with checkpoint `path` (a missing, truncated or altered file, an unreadable trainer state), or
    None when every file matches checksums.json. Reads every file once."""
    try:
        record = json.loads((path / CHECKSUMS).read_text())
    except FileNotFoundError:
        return f"no {CHECKSUMS} (saved by a nopetrain that did not record checksums; it cannot be verified)"
    except (OSError, ValueError) as err:
        return f"{CHECKSUMS} is unreadable ({type(err).__name__})"
    entries_ok = isinstance(record, dict) and all(
        isinstance(entry, dict) and entry.keys() == {"size", "sha256"} for entry in record.values()
    )
    if not entries_ok or TRAINER_STATE not in record:
        return f"{CHECKSUMS} does not hold a size and sha256 for every file and {TRAINER_STATE}"
    for name, expected in record.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != expected["size"]:
            return f"{name} has {size} bytes, {CHECKSUMS} records {expected['size']}"
        if _sha256(file) != expected["sha256"]:
            return f"{name} does not match its sha256 in {CHECKSUMS}"
    try:
        read_trainer_state(path)
    except ValueError:
        return f"{TRAINER_STATE} is not valid JSON"
    return None


def save(
    engine: DeepSpeedEngine,
    run_dir: str | Path,
    step: int,
    trainer_state: dict[str, Any],
    rank_state: dict[str, Any],
    keep: int,
    keep_steps: Collection[int] = (),
) -> Path:
    """Writes checkpoint `step` from every rank, publishes it atomically, and prunes all but the newest `keep` and
    those of `keep_steps`."""
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
        write_checksums(staging)
        if final.exists():
            # A resumed run that passes a step it had saved before replaces that checkpoint.
            shutil.rmtree(final)
        os.replace(staging, final)
        # Only checkpoints older than this one: newer ones (left by a resume=auto that skipped them as damaged) stay
        # until the run saves their step again, and the one it resumed from stays while it is the newest.
        older = [path for path in complete_checkpoints(root) if path.name < tag and step_of(path) not in keep_steps]
        for old in older[: max(0, len(older) - (keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)
        write_latest(root)
    dist.barrier()
    return final


def write_latest(root: Path) -> None:
    """Points `latest` at the newest complete checkpoint under root (removes it when there is none)."""
    found = complete_checkpoints(root)
    if found:
        write_bytes(root / "latest", found[-1].name.encode())
    else:
        (root / "latest").unlink(missing_ok=True)


def set_aside_newer(root: Path, step: int, folder: Path) -> list[str]:
    """Moves the complete checkpoints under root newer than `step` into folder (rank 0); returns their names."""
    newer = [path for path in complete_checkpoints(root) if step_of(path) > step]
    if newer:
        folder.mkdir(parents=True)
        for path in newer:
            os.replace(path, folder / path.name)
        write_latest(root)
    return [path.name for path in newer]


def resolve_resume(resume: str, run_dir: str | Path, rewind: bool) -> Path | None:
    """The checkpoint to resume from: `auto` -> newest intact one in run_dir (or None when it has none), `none` ->
    None (refused when run_dir already holds checkpoints, so nothing is overwritten), else that checkpoint directory,
    refused unless intact, and refused unless `rewind` when run_dir holds newer checkpoints. Rank 0 verifies (see
    find_damage) and tells the other ranks."""
    outcome: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            outcome[0] = _choose_checkpoint(resume, checkpoint_root(run_dir), rewind)
        except ExitError as err:
            outcome[0] = err
    dist.broadcast_object_list(outcome, src=0)
    if isinstance(outcome[0], ExitError):
        raise outcome[0]
    return outcome[0]


def _choose_checkpoint(resume: str, root: Path, rewind: bool) -> Path | None:
    found = complete_checkpoints(root)
    if resume == "auto":
        skipped = []
        for path in reversed(found):
            damage = find_damage(path)
            if damage is None:
                return path
            # Left in place for inspection: a damaged checkpoint is only replaced when the run saves its step again.
            log.warning("checkpoint.resume=auto: skipping %s (%s)", path, damage)
            skipped.append(path.name)
        if skipped:
            raise ConfigError(
                f"checkpoint.resume=auto: none of the checkpoints in {root} is intact ({', '.join(skipped)}, "
                "reasons in the warnings above); nothing was deleted: move them aside to start afresh, or choose "
                "another run.name"
            )
        return None
    if resume == "none":
        if found:
            raise ConfigError(
                f"checkpoint.resume=none but {root} already holds checkpoints; "
                "use checkpoint.resume=auto to continue or choose another run.name"
            )
        return None
    path = padded(Path(resume))
    if not (path / TRAINER_STATE).is_file():
        raise ConfigError(f"checkpoint.resume={resume}: not a complete nopetrain checkpoint (no {TRAINER_STATE})")
    damage = find_damage(path)
    if damage is not None:
        raise ConfigError(f"checkpoint.resume={resume}: {damage}")
    step = read_trainer_state(path)["step"]
    newer = [found_path.name for found_path in found if step_of(found_path) > step]
    if newer and not rewind:
        raise ConfigError(
            f"checkpoint.resume={resume} is step {step} but {root} holds newer checkpoints ({', '.join(newer)}); "
            f"set checkpoint.rewind=true to continue from step {step}, which moves them and the metrics rows after "
            f"step {step} into {root.parent / 'rewound'}/<UTC time>/"
        )
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
        with safe_torch_load():
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
    with safe_torch_load():
        return [torch.load(file) for file in sorted(path.glob("rank_*.pt"))]


def read_trainer_state(path: Path) -> dict[str, Any]:
    return json.loads((path / TRAINER_STATE).read_text())


def load(engine: DeepSpeedEngine, path: Path, universal: bool, weights_only: bool = False) -> dict[str, Any] | None:
    """Loads model and optimizer state into the engine (from the universal form when the number of processes
    changed); returns this rank's RNG and data-stream state, None if the saving run had no such rank. With
    `weights_only` the optimizer state stays fresh, and parameters the checkpoint lacks (DroPE's QK-norm gains, which
    the caller has checked are the only ones) keep their initial values."""
    load_dir, tag = (path, UNIVERSAL) if universal else (path.parent, path.name)
    with safe_torch_load():
        loaded, _ = engine.load_checkpoint(
            str(load_dir), tag=tag, load_module_strict=not weights_only, load_module_only=weights_only
        )
    if loaded is None:
        raise ConfigError(f"checkpoint {path}: DeepSpeed found no model states to load")
    rank_file = path / f"rank_{dist.get_rank():05d}.pt"
    if not rank_file.exists():
        if universal:
            return None
        raise ConfigError(f"checkpoint {path}: {rank_file.name} is missing")
    with safe_torch_load():
        return torch.load(rank_file)


def copy_tokenizer(record: dict[str, Any] | None, run_dir: Path, model_vocab_size: int) -> str | None:
    """Copies the data's tokenizer into run_dir/tokenizer/, so checkpoints and exports carry it; returns its path
    relative to run_dir."""
    if record is None:
        return None
    if 2 * int(record["vocab_size"]) <= model_vocab_size:
        log.warning(
            "model.vocab_size=%d is over twice the %d pieces of the data's tokenizer %s: the extra rows are never "
            "trained",
            model_vocab_size,
            record["vocab_size"],
            record["path"],
        )
    source = Path(record["path"])
    if not source.is_file():
        log.warning("tokenizer %s named by the data manifests is missing; checkpoints will not carry it", source)
        return None
    target = run_dir / "tokenizer" / source.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return str(target.relative_to(run_dir))


# Reading a checkpoint's weights outside training (export, evaluation): no process group, any ZeRO stage.


@dataclass
class CheckpointWeights:
    """A checkpoint as export and evaluation read it."""

    state: dict[str, Any]  # trainer_state.json
    model_config: ModelConfig
    weights: dict[str, torch.Tensor]  # our names, fp32, dormant QK-norm gains dropped


def read_state(path: Path) -> tuple[dict[str, Any], ModelConfig]:
    """The checkpoint's trainer state and model config, without its weights."""
    state_file = path / TRAINER_STATE
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    if not state_file.is_file():
        raise CheckpointError(f"{path}: not a nopetrain checkpoint (no {TRAINER_STATE})")
    try:
        state = json.loads(state_file.read_text())
        cfg = ModelConfig(**state["model_config"])
        validate_model(cfg)
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{state_file}: no usable model_config ({error_line(err)})") from None
    return state, cfg


def read_checkpoint(path: Path) -> CheckpointWeights:
    """The checkpoint's trainer state, model config and full fp32 weights, checked against our Transformer."""
    state, cfg = read_state(path)
    weights = _gather_fp32(path)
    # Gains built for a later DroPE switch exist in the checkpoint but do not act until it happens.
    unused = {"q_norm_weight": cfg.qk_norm == "none", "k_norm_weight": cfg.qk_norm != "qk"}
    weights = {key: value for key, value in weights.items() if not unused.get(key.rsplit(".", 1)[-1], False)}
    with torch.device("meta"):
        model = Transformer(cfg)
    try:
        # On the meta device, assign=True checks names and shapes without allocating a second copy.
        model.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit model_config ({error_line(err)})") from None
    return CheckpointWeights(state, cfg, weights)


def _gather_fp32(path: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # zero_to_fp32 reports progress on stdout and stderr; keep them for our own summary and errors.
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), safe_torch_load():
            return get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    except CheckpointError:
        raise
    except Exception as err:  # DeepSpeed and torch.load raise many types for missing or corrupt shards
        raise CheckpointError(f"{path}: cannot read the DeepSpeed shards ({error_line(err)})") from None
