"""Shared test set-up: configs composed by Hydra, real training runs in subprocesses (python train.py / torchrun)
and their metrics."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from nopetrain.config import ModelConfig, TrainConfig, register_configs
from nopetrain.parallel import free_port

if TYPE_CHECKING:
    from nopetrain.model import Transformer

REPO = Path(__file__).resolve().parents[1]


def composed(*overrides: str) -> TrainConfig:
    """The train config Hydra composes from configs/ with `overrides`, as train.py gets it."""
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return OmegaConf.to_object(compose("train", overrides=list(overrides)))


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    # The Makefile's cache folder for this checkout (keyed by its path), so a bare `pytest` reuses the ops that
    # `make` built instead of rebuilding them in a folder every checkout shares.
    checkout_key = hashlib.md5(str(REPO).encode()).hexdigest()[:12]
    env.setdefault(
        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "nopetrain" / "torch_extensions" / checkout_key)
    )
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    # Not the rendezvous of an in-process group a module fixture holds (set_one_rank_env): a child would join it
    # (its store's port is taken) instead of making its own. A test that starts ranks sets these itself.
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


# Real W&B, offline.
WANDB = "wandb.mode=offline"


def set_one_rank_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The variables torchrun gives a world of one (on a free port), set through `monkeypatch` so that they are
    undone after: an in-process run then makes the gloo group of one that `python train.py` makes."""
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", str(free_port()))


def train_command(run_dir: Path, *overrides: str, nproc: int = 1) -> list[str]:
    """train.py on the tiny model in fp32 with `overrides` (synthetic data and a single phase unless they choose a
    data config or curriculum), in one process or under torchrun. W&B is off unless they pass WANDB (the tests of
    W&B, and of signals that reach its service, do): it adds 2-4 s to every start, of which the suite has hundreds."""
    groups = {"data": "data=synthetic", "curriculum": "curriculum=single"}
    defaults = [default for group, default in groups.items() if not any(o.startswith(f"{group}=") for o in overrides)]
    args = [f"run.dir={run_dir}", "precision=fp32", "log_every=1", "wandb.mode=disabled", *defaults, *overrides]
    if nproc == 1:
        return [sys.executable, str(REPO / "train.py"), *args]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*launcher, str(REPO / "train.py"), *args]


def run_train(
    run_dir: Path, *overrides: str, nproc: int = 1, check: bool = True, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Runs train_command(...) to completion."""
    cmd = train_command(run_dir, *overrides, nproc=nproc)
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def copy_run(saved_run: Path, tmp_path: Path) -> Path:
    """A copy of a module fixture's run directory for one test to change (resume, damage, rewind)."""
    run_dir = tmp_path / "run"
    shutil.copytree(saved_run, run_dir)
    return run_dir


def losses(run_dir: Path) -> dict[int, float]:
    """Loss per step from run_dir/metrics.jsonl (a resume moves the rows after its step aside: each step once)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def build_corpus(output: Path) -> Path:
    """A small default corpus (real tokenizer, real shards) at seq_len 64 for trainer tests."""
    cmd = [sys.executable, "-m", "nopetrain.data_pipelines", "build-default", "--output", str(output)]
    cmd += ["--seq-len", "64", "--vocab-size", "1024", "--max-mb-per-source", "0.25", "--workers", "1"]
    subprocess.run(cmd, cwd=REPO, env=subprocess_env(), check=True, capture_output=True, timeout=300)
    return output


def corpus_overrides(corpus: Path) -> list[str]:
    """Points the default data config at `corpus` (built by build_corpus) for the tiny model."""
    return ["data=default", f"data.root={corpus}", "seq_len=64", "model.vocab_size=1024"]


def wandb_runs(run_dir: Path) -> list:
    """The run records (id, group, name) of every offline W&B run under run_dir/wandb, read from their .wandb files
    (a LevelDB-style log of protobuf records: 32 KiB blocks, 7-byte chunk headers, after a 7-byte file header)."""
    from wandb.proto import wandb_internal_pb2

    found = []
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        data, pos, block, pending = path.read_bytes(), 7, 32768, b""
        while pos + 7 <= len(data):
            if block - pos % block < 7:
                pos += block - pos % block
                continue
            length, kind = struct.unpack_from("<HB", data, pos + 4)
            pending += data[pos + 7 : pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # a whole record, or the last chunk of one
                record = wandb_internal_pb2.Record.FromString(pending)
                pending = b""
                if record.WhichOneof("record_type") == "run":
                    found.append(record.run)
    return found


def tiny_model(**overrides) -> Transformer:
    """A two-layer model in eval mode, seeded: `overrides` set ModelConfig keys. The model is imported here, not
    with this module: conftest imports it before any kernel test sets TRITON_INTERPRET."""
    from nopetrain.model import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return Transformer(cfg).eval()


def damage_one_of_two_web_shards(corpus: Path, tmp_path: Path, shard: int) -> Path:
    """A copy of the corpus whose web source has two shards, one of them cut short: with two ranks, each reads one."""
    copy = tmp_path / "corpus"
    shutil.copytree(corpus, copy)
    manifest_path = copy / "train" / "web" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"] = manifest["shards"][:2]
    manifest_path.write_text(json.dumps(manifest))
    bad = copy / "train" / "web" / manifest["shards"][shard]["path"]
    bad.write_bytes(bad.read_bytes()[:1000])
    return copy
