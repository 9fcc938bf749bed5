"""Process group set-up and the DeepSpeed ZeRO engine: one process (`python train.py`) or many (torchrun).

gloo on CPU, NCCL on GPU. The DeepSpeed JSON is generated from the structured config so that every setting has
one source; `deepspeed.extra` is merged last for anything the schema does not name.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder
from deepspeed.runtime.config import MUON_OPTIMIZER
from deepspeed.runtime.engine import DeepSpeedEngine

from nopetrain.config import ConfigError, TrainConfig
from nopetrain.model import Transformer
from nopetrain.optim import param_groups
from nopetrain.ownership import HolderLock
from nopetrain.slurm import loopback_warning, rank_env_from_slurm

log = logging.getLogger("nopetrain")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    owns_group: bool = False  # init_distributed made the process group (no caller had)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def skip_shm_comm() -> None:
    """Keeps DeepSpeed's shared-memory all-reduce (a C++ op compiled on first start, minutes on a small machine,
    silently) out of CPU runs: gloo does the collectives, which at the sizes a CPU trains are not the bottleneck."""
    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


# DeepSpeed's Muon kernels, decorated with torch.compile at import.
MUON_KERNELS = "deepspeed.runtime.zero.muon.original_muon"


def _no_muon(*args: object, **kwargs: object) -> None:
    raise RuntimeError("this run's optimizer is not Muon; DeepSpeed's Muon kernels are not loaded in this process")


def skip_muon_import(ds_config: dict[str, Any]) -> None:
    """Keeps DeepSpeed's Muon kernels from being imported by a run whose optimizer is not Muon: ZeRO imports them
    in every gradient reduction and calls them only for parameters marked `use_muon`, and importing them compiles
    (torch.compile imports torch._dynamo and inductor: about 2 s of every start on a 2-core machine). Unless
    `deepspeed.extra` asks for Muon, a stand-in module whose functions refuse to run takes their place."""
    if str(ds_config["optimizer"]["type"]).lower() != MUON_OPTIMIZER and MUON_KERNELS not in sys.modules:
        stand_in = types.ModuleType(MUON_KERNELS, "nopetrain's stand-in: this process runs no Muon optimizer")
        stand_in.muon_update = stand_in.adam_update = _no_muon
        stand_in.MuonWithAuxAdam = type("MuonWithAuxAdam", (torch.optim.Optimizer,), {"__init__": _no_muon})
        sys.modules[MUON_KERNELS] = stand_in


def optimizer_ops(cfg: TrainConfig, cpu: bool) -> list[str]:
    """The DeepSpeed op builders the run's optimizer loads: C++/CUDA code that DeepSpeed JIT-builds on first use
    unless it was installed with the op prebuilt (the Dockerfile prebuilds both)."""
    if cfg.deepspeed.offload_optimizer:
        return ["CPUAdamBuilder"]
    return [] if cpu else ["FusedAdamBuilder"]


def build_deepspeed_ops(cfg: TrainConfig, cpu: bool) -> None:
    """Loads the optimizer's DeepSpeed ops before deepspeed.initialize does, building those not prebuilt (see
    `build_op`)."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import _get_build_directory  # where torch's load() builds, and puts its lock

    for builder_name in optimizer_ops(cfg, cpu):
        builder = get_accelerator().create_op_builder(builder_name)
        if not installed_ops.get(builder.name, False):
            build_dir = Path(_get_build_directory(builder.name, verbose=False))
            build_op(builder.name, build_dir, lambda builder=builder: builder.load(verbose=False))


def build_op(name: str, build_dir: Path, load: Callable[[], object]) -> None:
    """Runs `load` (which builds op `name` in build_dir unless built) under a HolderLock beside build_dir, saying
    what it waits for and what it builds. torch's build waits on a bare `lock` file in build_dir, which a build
    killed part-way leaves behind: every later start then waited forever without a word. With our lock held, such a
    file can only be a dead build's, and it is removed with a warning."""
    lock = HolderLock(build_dir.with_name(f"{build_dir.name}.owner"))
    holder = lock.try_acquire()
    if holder is not None:
        log.info("waiting for %s, which is building DeepSpeed's %s op in %s", holder, name, build_dir)
        lock.acquire()
    try:
        stale = build_dir / "lock"
        if stale.exists():
            log.warning("removed %s, left by a build of DeepSpeed's %s op that was killed", stale, name)
            stale.unlink()
        built = (build_dir / f"{name}.so").exists()
        if not built:
            log.info(
                "building DeepSpeed's %s op in %s (first start with this TORCH_EXTENSIONS_DIR; minutes)",
                name,
                build_dir,
            )
        start = time.monotonic()
        load()
        if not built:
            log.info("built DeepSpeed's %s op in %.0f s", name, time.monotonic() - start)
    finally:
        lock.release()


def init_distributed() -> DistEnv:
    """Joins the process group torchrun (or SLURM, one task per GPU) describes in the environment, or makes a group
    of one."""
    # DeepSpeed's ZeRO-3 calls these collectives on every step and torch warns on every call; a user can do nothing
    # about it, and it buried the training log (27 warnings in 6 steps).
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
        category=FutureWarning,
    )
    os.environ.update(rank_env_from_slurm(os.environ))
    # A world of one (`python train.py`) meets itself through an in-process store: no port to pick. A free port picked
    # and released for env:// could be taken before the store bound it (EADDRINUSE, seen with the suite's two workers).
    # (Also a later run in this process, a local Hydra sweep's next member, which finds the first one's RANK set.)
    alone = "RANK" not in os.environ or (os.environ.get("WORLD_SIZE") == "1" and "MASTER_PORT" not in os.environ)
    if alone:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        # SLURM may bind each task to its own GPU (--gpus-per-task): then it sees one device, whatever its rank.
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    owns_group = not dist.is_initialized()
    if owns_group:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cpu":
            skip_shm_comm()
        if alone:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            warn_of_a_loopback_hostname()
        try:
            deepspeed.init_distributed(dist_backend=backend, verbose=False)
        except dist.DistNetworkError as err:
            if "EADDRINUSE" not in str(err):
                raise
            address = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
            raise ConfigError(
                f"MASTER_PORT={os.environ.get('MASTER_PORT')}: the rendezvous port {address} is taken by another "
                "process; set MASTER_PORT to a free port"
            ) from None
    return DistEnv(dist.get_rank(), local_rank, dist.get_world_size(), device, owns_group)


def warn_of_a_loopback_hostname() -> None:
    """The one-line hint of slurm.loopback_warning, before a multi-node rendezvous that would fail on it."""
    hostname = socket.gethostname()
    try:
        address = socket.gethostbyname(hostname)
    except OSError:
        return
    warning = loopback_warning(hostname, address, os.environ)
    if warning is not None:
        log.warning(warning)


def destroy_process_group(env: DistEnv) -> None:
    """Destroys the group init_distributed made, while the interpreter is whole, on every way out of a run: gloo's
    worker threads left to its teardown abort the process now and then ("terminate called without an active
    exception", exit -6, seen on rank 1 of a 2-rank ZeRO-3 run and on refused starts; pytorch#190489). DeepSpeed's
    own call, so that it also forgets the groups it derived from this one and a later run in the process (a local
    Hydra sweep) starts afresh. It does not close the group's connections while the engine still holds the group:
    a rank that failed alone closes them by exiting, which ends the collective its peers wait in (see
    `ownership.FailureRecord`)."""
    if env.owns_group and dist.is_initialized():
        deepspeed.comm.destroy_process_group()


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 where the device supports it (precision=auto), fp32 on request or on CPU."""
    if precision == "bf16":
        return True
    return precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()


def gradient_accumulation_steps(cfg: TrainConfig, world_size: int) -> int:
    return cfg.global_batch_size // (cfg.micro_batch_size * world_size)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and key in merged else value
    return merged


def optimizer_params(cfg: TrainConfig, cpu: bool) -> dict[str, Any]:
    """AdamW's settings for DeepSpeed. On CPU, torch's own fused AdamW (DeepSpeed's client-optimizer path): DeepSpeed's
    CPU Adam is a C++ op compiled on first start, and it keeps beta^t as a running float32 product, so a resumed run
    drifts from a straight one by ulps; torch computes beta^t from the step count and resumes bit-exactly."""
    params: dict[str, Any] = {
        "lr": cfg.optim.lr,
        "betas": list(cfg.optim.betas),
        "eps": cfg.optim.eps,
        "weight_decay": cfg.optim.weight_decay,
    }
    if cpu and not cfg.deepspeed.offload_optimizer:
        params.update(torch_adam=True, fused=True)
    return params


def deepspeed_config(
    cfg: TrainConfig, world_size: int, bf16: bool, cpu: bool, load_universal: bool = False
) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": cfg.deepspeed.stage}
    if cfg.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if cfg.deepspeed.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    ds = {
        "train_batch_size": cfg.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps(cfg, world_size),
        "gradient_clipping": cfg.optim.grad_clip,
        "optimizer": {"type": "AdamW", "params": optimizer_params(cfg, cpu)},
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        # A checkpoint from a run with another number of processes is loaded in DeepSpeed's universal form.
        "checkpoint": {"load_universal": load_universal},
        # The trainer does its own logging; keep DeepSpeed's periodic prints out of the console.
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    return _merge(ds, dict(cfg.deepspeed.extra))


def load_weights(model: Transformer, weights: dict[str, torch.Tensor], partitioned: bool) -> None:
    """Copies pretrained `weights` into the model; under ZeRO-3 the partitions are gathered, filled on rank 0 and
    scattered again. Only QK-norm gains built for a later DroPE switch may be missing."""
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0, enabled=partitioned):
        if not partitioned or dist.get_rank() == 0:
            missing, unexpected = model.load_state_dict(weights, strict=False)
            missing = [key for key in missing if not key.endswith(("q_norm_weight", "k_norm_weight"))]
            if missing or unexpected:
                raise ValueError(f"pretrained weights do not fit the model: missing {missing}, unexpected {unexpected}")


def build_engine(
    cfg: TrainConfig,
    env: DistEnv,
    extra_qk_norm: str = "none",
    pretrained: dict[str, torch.Tensor] | None = None,
    load_universal: bool = False,
) -> DeepSpeedEngine:
    """Builds the model (partitioned as it is constructed under ZeRO-3), fills in `pretrained` weights if given, and
    wraps it in a DeepSpeed engine; `extra_qk_norm` builds QK-norm gains a later DroPE switch will use (see
    nopetrain/drope.py)."""
    bf16 = use_bf16(cfg.precision, env.device)
    ds_config = deepspeed_config(cfg, env.world_size, bf16, env.device.type == "cpu", load_universal)
    torch.manual_seed(cfg.seed)
    stage3 = cfg.deepspeed.stage == 3
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=stage3):
        model = Transformer(cfg.model, extra_qk_norm, cfg.activation_checkpointing, cfg.loss.chunk_tokens)
    if pretrained is not None:
        load_weights(model, pretrained, partitioned=stage3)
    build_deepspeed_ops(cfg, env.device.type == "cpu")
    skip_muon_import(ds_config)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.optim), config=ds_config, dist_init_required=False
    )
    return engine
