"""The training loop: set up, resume, then step -> log -> checkpoint until the configured step count.

One optimizer step consumes `global_batch_size` sequences: each rank runs `accumulation` micro-batches through the
DeepSpeed engine, which averages gradients over micro-batches and ranks and applies AdamW at the boundary. Nothing
in the step reads a value back to the host; losses are summed on the device and reported every `log_every` steps.
DeepSpeed itself skips an update whose gradients are not finite (and reads that flag back); the loop counts those
skips and stops the run after `max_consecutive_nonfinite` of them in a row.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from nopetrain import checkpoint
from nopetrain.config import ConfigError, TrainConfig, validate
from nopetrain.data import build_stream
from nopetrain.metrics import MetricsLogger, flops_per_token, memory_gib, peak_tflops
from nopetrain.model import count_parameters, lm_loss
from nopetrain.optim import lr_at
from nopetrain.parallel import build_engine, gradient_accumulation_steps, init_distributed, use_bf16

log = logging.getLogger("nopetrain")

# Model keys a resumed run may change; everything else must match the checkpoint's architecture.
RUNTIME_MODEL_KEYS = {"attn_logit_scale"}


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


def setup_logging(rank: int, run_dir: Path) -> None:
    """Rank 0 logs INFO to the console; every rank logs to run_dir/logs/rank_N.log."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    formatter = logging.Formatter("%(asctime)s rank%(rank)s %(levelname)s %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    file = logging.FileHandler(run_dir / "logs" / f"rank_{rank:05d}.log")
    for handler in (console, file):
        handler.setFormatter(formatter)
        handler.addFilter(lambda record: setattr(record, "rank", rank) or True)
    log.handlers[:] = [console, file]
    log.setLevel(logging.INFO)
    log.propagate = False


def check_compatible(saved_model: dict[str, Any], cfg: TrainConfig, path: Path) -> None:
    current = dataclasses.asdict(cfg.model)
    for key, value in current.items():
        if key not in RUNTIME_MODEL_KEYS and saved_model.get(key) != value:
            raise ConfigError(
                f"model.{key}={value!r} but checkpoint {path} was trained with model.{key}={saved_model.get(key)!r}"
            )


def copy_tokenizer(record: dict[str, Any] | None, run_dir: Path) -> str | None:
    """Copies the data's tokenizer into run_dir/tokenizer/, so checkpoints and exports carry it; returns its path
    relative to run_dir."""
    if record is None:
        return None
    source = Path(record["path"])
    if not source.is_file():
        log.warning("tokenizer %s named by the data manifests is missing; checkpoints will not carry it", source)
        return None
    target = run_dir / "tokenizer" / source.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return str(target.relative_to(run_dir))


def set_lr(engine: Any, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Runs (or resumes) training as configured; returns the final trainer state."""
    env = init_distributed()
    validate(cfg, env.world_size)
    run_dir = Path(cfg.run.dir)
    setup_logging(env.rank, run_dir)
    resume_from = checkpoint.resolve_resume(cfg.checkpoint.resume, run_dir)

    engine = build_engine(cfg, env)
    bf16 = use_bf16(cfg.precision, env.device)
    accumulation = gradient_accumulation_steps(cfg, env.world_size)
    config_dict = dataclasses.asdict(cfg)
    stream = build_stream(cfg, env.rank, env.world_size)
    state: dict[str, Any] = {"step": 0, "tokens_seen": 0, "wandb_run_id": uuid.uuid4().hex[:12]}

    if resume_from is not None:
        saved = checkpoint.read_trainer_state(resume_from)
        check_compatible(saved["config"]["model"], cfg, resume_from)
        if saved["world_size"] != env.world_size:
            raise ConfigError(
                f"checkpoint {resume_from} was written by {saved['world_size']} ranks and this run has "
                f"{env.world_size}; ZeRO optimizer shards need the same data-parallel size"
            )
        rank_state = checkpoint.load(engine, resume_from)
        state.update(step=saved["step"], tokens_seen=saved["tokens_seen"], wandb_run_id=saved["wandb_run_id"])
        checkpoint.set_rng_state(rank_state["rng"])
        data_state = rank_state["data"]
        if saved["config"]["data"]["num_workers"] != cfg.data.num_workers:
            # Each rank's position covers only its own readers: re-split what is left over the new ones.
            data_state = stream.merge_states([s["data"] for s in checkpoint.read_rank_states(resume_from)])
        stream.load_state_dict(data_state)
        log.info("resumed from %s at step %d", resume_from, state["step"])
    if env.is_main:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    tokenizer = copy_tokenizer(stream.tokenizer, run_dir) if env.is_main else None
    log.info(
        "model %s: %s parameters, layers with RoPE: %s; %d rank(s) x %d micro-batch(es) of %d x %d tokens, %s",
        cfg.model.name,
        f"{count_parameters(engine.module):,}",
        "".join("R" if rope else "N" for rope in cfg.model.rope_layers()),
        env.world_size,
        accumulation,
        cfg.micro_batch_size,
        cfg.seq_len,
        "bf16" if bf16 else "fp32",
    )
    last_step = cfg.stop_at_step or cfg.steps
    if state["step"] >= last_step:
        log.info("run %s is already at step %d (of %d); nothing to do", run_dir, state["step"], last_step)
        return state
    if cfg.compile:
        engine.compile()

    metrics = MetricsLogger(cfg, state["wandb_run_id"], config_dict, state["step"], enabled=env.is_main)
    metrics.event(f"training steps {state['step'] + 1}-{last_step} of {cfg.steps}; run directory {run_dir}")
    flops_per_step = flops_per_token(cfg.model, cfg.seq_len) * cfg.global_batch_size * cfg.seq_len
    peak = peak_tflops(env.device, bf16, cfg.peak_tflops)
    loss_sum = torch.zeros((), device=env.device)
    finite_micro_batches = torch.zeros((), device=env.device)
    skipped_seen, consecutive_skipped = engine.skipped_steps, 0
    interval_start, interval_steps = time.perf_counter(), 0
    try:
        while state["step"] < last_step:
            lr = lr_at(state["step"], cfg.steps, cfg.optim.lr, cfg.schedule)
            set_lr(engine, lr)
            for _ in range(accumulation):
                batch = stream.next_batch().to(env.device)
                loss = lm_loss(engine(batch.input_ids, batch.position_ids, batch.segments), batch.labels)
                engine.backward(loss)
                engine.step()
                finite = torch.isfinite(loss.detach())
                loss_sum += torch.where(finite, loss.detach(), 0.0)
                finite_micro_batches += finite
            state["step"] += 1
            state["tokens_seen"] += cfg.global_batch_size * cfg.seq_len
            interval_steps += 1
            metrics.advance(state["step"])

            skipped = engine.skipped_steps > skipped_seen
            skipped_seen = engine.skipped_steps
            consecutive_skipped = consecutive_skipped + 1 if skipped else 0
            if skipped:
                log.warning("step %d: non-finite loss or gradient, update skipped", state["step"])
            if consecutive_skipped >= cfg.max_consecutive_nonfinite:
                saved = checkpoint.complete_checkpoints(checkpoint.checkpoint_root(run_dir))
                raise NonFiniteLossError(
                    f"{consecutive_skipped} optimizer steps in a row (to step {state['step']}) had a non-finite loss "
                    f"or gradient (max_consecutive_nonfinite={cfg.max_consecutive_nonfinite}); last good checkpoint: "
                    f"{saved[-1] if saved else 'none'}"
                )

            done = state["step"] >= last_step
            if state["step"] % cfg.log_every == 0 or done:
                totals = torch.stack([loss_sum, finite_micro_batches])
                dist.all_reduce(totals)
                loss_total, finite_count = totals.tolist()
                elapsed = time.perf_counter() - interval_start
                tokens_per_s = interval_steps * cfg.global_batch_size * cfg.seq_len / elapsed
                tflops = interval_steps * flops_per_step / elapsed / env.world_size / 1e12
                grad_norm = engine.get_global_grad_norm()
                row = {
                    "loss": loss_total / finite_count if finite_count else float("nan"),
                    "lr": lr,
                    "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                    "tokens_per_s": tokens_per_s,
                    "tokens_per_s_per_device": tokens_per_s / env.world_size,
                    "tflops_per_device": tflops,
                    "tokens_seen": float(state["tokens_seen"]),
                    "skipped_steps": float(engine.skipped_steps),
                    "nonfinite_micro_batches": interval_steps * accumulation * env.world_size - finite_count,
                    "memory_gib": memory_gib(env.device),
                }
                if peak is not None:
                    row["mfu"] = tflops / peak
                row.update(stream.stats())
                metrics.log(state["step"], row)
                loss_sum.zero_()
                finite_micro_batches.zero_()
                interval_start, interval_steps = time.perf_counter(), 0

            if (state["step"] % cfg.checkpoint.every == 0 or done) and not skipped:
                trainer_state = {
                    **state,
                    "world_size": env.world_size,
                    "skipped_steps": engine.skipped_steps,
                    "config": config_dict,
                    # The model as it is now (after a DroPE switch its layers are NoPE), for export and evaluation.
                    "model_config": dataclasses.asdict(engine.module.config),
                    "tokenizer": tokenizer,
                }
                rank_state = {"rng": checkpoint.rng_state(), "data": stream.state_dict()}
                path = checkpoint.save(engine, run_dir, state["step"], trainer_state, rank_state, cfg.checkpoint.keep)
                metrics.event(f"checkpoint saved: {path}")
    finally:
        metrics.close()
        stream.close()
    return state
