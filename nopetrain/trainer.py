"""The training loop: set up, resume, then for each optimizer step: enter its phase, switch to NoPE if DroPE says
so, set the learning rate, run the micro-batches, log, checkpoint.

One optimizer step consumes the phase's `global_batch_size` sequences: each rank runs `accumulation` micro-batches
through the DeepSpeed engine, which averages gradients over micro-batches and ranks and applies AdamW at the
boundary. Nothing in the step reads a value back to the host; losses are summed on the device and reported every
`log_every` steps. DeepSpeed itself skips an update whose gradients are not finite (and reads that flag back); the
loop counts those skips and stops the run after `max_consecutive_nonfinite` of them in a row.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from nopetrain import checkpoint
from nopetrain.atomic import write_bytes
from nopetrain.config import TrainConfig, validate
from nopetrain.curriculum import Phase, Schedule, learning_rate, resolve
from nopetrain.data.phased import PhasedStream
from nopetrain.drope import dormant_qk_norm, reset_optimizer_state, switch_to_nope
from nopetrain.eval.training import TrainingEval
from nopetrain.exits import NONFINITE, ExitError
from nopetrain.hf import load_hf_state_dict, pretrained_model
from nopetrain.kernels import set_attention_backend
from nopetrain.kernels import set_backend as set_kernel_backend
from nopetrain.metrics import MetricsLogger, flops_per_token, memory_gib, peak_tflops, setup_logging
from nopetrain.model import count_parameters
from nopetrain.ownership import FailureRecord, die_with_torchrun_agent, own_run_dir
from nopetrain.parallel import DistEnv, build_engine, destroy_process_group, init_distributed, use_bf16
from nopetrain.preemption import PREEMPTED_BY_FILE, Preempted, PreemptionWatch
from nopetrain.profiling import StepProfiler
from nopetrain.resume import prepare_resume

log = logging.getLogger("nopetrain")


class NonFiniteLossError(ExitError, RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""

    exit_code = NONFINITE


def set_lr(engine: Any, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        env: DistEnv,
        schedule: Schedule,
        pretrained: dict[str, Any] | None,
        resize: bool,
        watch: PreemptionWatch,
    ) -> None:
        """`resize`: the run resumes from a checkpoint written by another number of processes."""
        self.cfg, self.env, self.schedule, self.watch = cfg, env, schedule, watch
        self.run_dir = Path(cfg.run.dir)
        extra_qk_norm = dormant_qk_norm(cfg.curriculum.drope, schedule.drope_step)
        self.engine = build_engine(cfg, env, extra_qk_norm, pretrained, load_universal=resize)
        self.resize = resize
        self.bf16 = use_bf16(cfg.precision, env.device)
        self.stream = PhasedStream(cfg, schedule, env.rank, env.world_size)
        self.state: dict[str, Any] = {
            "step": 0,
            "tokens_seen": 0,
            "wandb_run_id": uuid.uuid4().hex[:12],
            "drope_step": None,
            "phase": schedule.phases[0].name,
        }
        self.config_dict = dataclasses.asdict(cfg)
        self.tokenizer: str | None = None
        self.metrics: MetricsLogger | None = None
        self.phase: Phase | None = None
        self.accumulation = 0
        self.evaluator = TrainingEval(cfg) if cfg.eval.every else None
        self.profiler = StepProfiler(cfg.profile, self.run_dir, env.rank, env.device)

    def resume(self, path: Path, saved: dict[str, Any], weights_only: bool) -> None:
        """Continues from checkpoint `path` (`saved`: its trainer state, checked by check_resumed_config); with
        `weights_only` (DroPE started on a RoPE checkpoint) the optimizer starts fresh. A checkpoint of another run
        directory starts a run of its own in W&B."""
        if self.resize:
            log.info(
                "checkpoint %s was written by %d process(es), this run has %d: loading DeepSpeed's universal form of "
                "it (model and optimizer state re-partitioned) and re-splitting the data positions of all its ranks",
                path,
                saved["world_size"],
                self.env.world_size,
            )
            checkpoint.convert_to_universal(path)
        rank_state = checkpoint.load(self.engine, path, universal=self.resize, weights_only=weights_only)
        branched = checkpoint.checkpoint_root(self.run_dir).resolve() != path.resolve().parent
        for key in ("step", "tokens_seen", "drope_step", *(() if branched else ("wandb_run_id",))):
            self.state[key] = saved[key]
        if rank_state is not None:
            checkpoint.set_rng_state(rank_state["rng"])
        if self.resize or saved["config"]["data"]["num_workers"] != self.cfg.data.num_workers:
            # Each rank's position covers only its own readers: re-split what is left over the new ones.
            data_state = self.stream.merge_states([s["data"] for s in checkpoint.read_rank_states(path)])
        else:
            data_state = rank_state["data"]
        self.stream.load_state_dict(data_state)
        if self.state["drope_step"] is not None:
            switch_to_nope(self.engine, self.cfg.curriculum.drope.qk_norm)
        log.info("resumed from %s at step %d", path, self.state["step"])

    def enter_phase(self, phase: Phase) -> None:
        """Mixture weights, sequence length and batch size of `phase`, from this step on."""
        self.phase = phase
        self.state["phase"] = phase.name
        self.stream.set_phase(phase)
        self.engine.set_train_batch_size(phase.global_batch_size)
        self.accumulation = phase.global_batch_size // (self.cfg.micro_batch_size * self.env.world_size)
        weights = ", ".join(f"{name}={weight:.3g}" for name, weight in phase.weights.items())
        message = (
            f"phase {phase.name} ({self.schedule.phases.index(phase) + 1}/{len(self.schedule.phases)}), steps "
            f"{phase.start + 1}-{phase.end}: seq_len {phase.seq_len}, batch {phase.global_batch_size}"
            + (f", weights {weights}" if weights else "")
        )
        if phase.start == self.state["step"]:
            self.metrics.mark(phase.start, "phase", message)
        else:
            # Resumed inside the phase: its start is marked in metrics.jsonl already.
            self.metrics.event(f"continuing {message}")

    def drop_positional_encoding(self) -> None:
        """The DroPE switch, before this step's forward pass."""
        drope, step = self.cfg.curriculum.drope, self.state["step"]
        switch_to_nope(self.engine, drope.qk_norm)
        if drope.reset_optimizer:
            reset_optimizer_state(self.engine)
        self.state["drope_step"] = step
        self.metrics.mark(
            step,
            "drope",
            f"DroPE from step {step + 1}: RoPE dropped from all {len(self.engine.module.layers)} layers, "
            f"qk_norm={drope.qk_norm}, recalibration lr={drope.lr if drope.lr is not None else 'main schedule'}, "
            f"optimizer {'reset' if drope.reset_optimizer else 'kept'}",
        )

    def save(self) -> Path:
        trainer_state = {
            **self.state,
            "world_size": self.env.world_size,
            "skipped_steps": self.engine.skipped_steps,
            "config": self.config_dict,
            # The model as it is now (after a DroPE switch its layers are NoPE), for export and evaluation.
            "model_config": dataclasses.asdict(self.engine.module.config),
            "tokenizer": self.tokenizer,
        }
        rank_state = {"rng": checkpoint.rng_state(), "data": self.stream.state_dict()}
        path = checkpoint.save(
            self.engine,
            self.run_dir,
            self.state["step"],
            trainer_state,
            rank_state,
            self.cfg.checkpoint.keep,
            self.cfg.checkpoint.keep_steps,
        )
        self.metrics.event(f"checkpoint saved: {path}")
        return path

    def run(self) -> dict[str, Any]:
        cfg, env, engine, state = self.cfg, self.env, self.engine, self.state
        if env.is_main:
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
            self.tokenizer = checkpoint.copy_tokenizer(self.stream.tokenizer, self.run_dir, cfg.model.vocab_size)
        log.info(
            "model %s: %s parameters, layers with RoPE: %s; %d rank(s) x %d micro-batch(es) of %d sequences, %s",
            cfg.model.name,
            f"{count_parameters(engine.module):,}",
            "".join("R" if layer.attn.use_rope else "N" for layer in engine.module.layers),
            env.world_size,
            self.schedule.phase_at(min(state["step"], cfg.steps - 1)).global_batch_size
            // (cfg.micro_batch_size * env.world_size),
            cfg.micro_batch_size,
            "bf16" if self.bf16 else "fp32",
        )
        last_step = cfg.stop_at_step or cfg.steps
        if state["step"] >= last_step:
            log.info("run %s is already at step %d (of %d); nothing to do", self.run_dir, state["step"], last_step)
            return state
        if cfg.compile:
            engine.compile()
        self.metrics = MetricsLogger(cfg, state["wandb_run_id"], self.config_dict, state["step"], env.is_main)
        self.metrics.event(f"training steps {state['step'] + 1}-{last_step} of {cfg.steps}; run dir {self.run_dir}")
        try:
            self._loop(last_step)
        finally:
            self.metrics.close()
            self.stream.close()
        return state

    def _loop(self, last_step: int) -> None:
        cfg, env, engine, state, schedule = self.cfg, self.env, self.engine, self.state, self.schedule
        peak = peak_tflops(env.device, self.bf16, cfg.peak_tflops)
        loss_sum = torch.zeros((), device=env.device)
        finite_micro_batches = torch.zeros((), device=env.device)
        micro_batches = interval_tokens = interval_flops = 0
        skipped_seen, consecutive_skipped = engine.skipped_steps, 0
        interval_start = time.perf_counter()
        while state["step"] < last_step:
            self.watch.start_step()
            step = state["step"]
            self.profiler.start_step(step + 1)
            if self.phase is None or step >= self.phase.end:
                self.enter_phase(schedule.phase_at(step))
            if step == schedule.drope_step and state["drope_step"] is None:
                self.drop_positional_encoding()
            lr = learning_rate(schedule, cfg, step)
            set_lr(engine, lr)
            for micro in range(self.accumulation):
                # The trainer owns the boundary: DeepSpeed's own counter would misplace it when a phase changes
                # the number of micro-batches per step.
                engine.set_gradient_accumulation_boundary(micro == self.accumulation - 1)
                batch = self.stream.next_batch().to(env.device)
                loss = engine(batch.input_ids, batch.position_ids, batch.segments, labels=batch.labels)
                engine.backward(loss)
                finite = torch.isfinite(loss.detach())
                loss_sum += torch.where(finite, loss.detach(), 0.0)
                finite_micro_batches += finite
            engine.step()
            self.profiler.end_step(step + 1)
            step_tokens = self.phase.global_batch_size * self.phase.seq_len
            state["step"] += 1
            state["tokens_seen"] += step_tokens
            micro_batches += self.accumulation * env.world_size
            interval_tokens += step_tokens
            interval_flops += flops_per_token(cfg.model, self.phase.seq_len) * step_tokens
            self.metrics.advance(state["step"])

            skipped = engine.skipped_steps > skipped_seen
            skipped_seen = engine.skipped_steps
            consecutive_skipped = consecutive_skipped + 1 if skipped else 0
            if skipped:
                log.warning("step %d: non-finite loss or gradient, update skipped", state["step"])
            if consecutive_skipped >= cfg.max_consecutive_nonfinite:
                saved = checkpoint.complete_checkpoints(checkpoint.checkpoint_root(self.run_dir))
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
                tflops = interval_flops / elapsed / env.world_size / 1e12
                grad_norm = engine.get_global_grad_norm()
                row = {
                    "loss": loss_total / finite_count if finite_count else float("nan"),
                    "lr": lr,
                    "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                    "tokens_per_s": interval_tokens / elapsed,
                    "tokens_per_s_per_device": interval_tokens / elapsed / env.world_size,
                    "tflops_per_device": tflops,
                    "tokens_seen": float(state["tokens_seen"]),
                    "skipped_steps": float(engine.skipped_steps),
                    "nonfinite_micro_batches": micro_batches - finite_count,
                    "memory_gib": memory_gib(env.device),
                    "phase": self.phase.name,
                    "phase_index": float(schedule.phases.index(self.phase)),
                    "nope": float(state["drope_step"] is not None),
                }
                if peak is not None:
                    row["mfu"] = tflops / peak
                row.update(self.stream.stats())
                if self.evaluator is not None and state["step"] % cfg.eval.every == 0:
                    row.update(self.evaluator(engine.module, self.phase.seq_len))
                self.metrics.log(state["step"], row)
                loss_sum.zero_()
                finite_micro_batches.zero_()
                micro_batches = interval_tokens = interval_flops = 0
                interval_start = time.perf_counter()

            # Waits for the vote started at the top of the step (long complete by now): no host sync of the device.
            preempted = self.watch.signalled() and not done
            scheduled = state["step"] % cfg.checkpoint.every == 0 or state["step"] in cfg.checkpoint.keep_steps
            if ((scheduled or done) and not skipped) or preempted:
                saved_to = self.save()
            if preempted:
                stop = Preempted(state["step"], str(saved_to), self.watch.signal_name())
                if self.env.is_main:
                    write_bytes(Path(cfg.run.dir) / PREEMPTED_BY_FILE, f"{stop.signal_name}\n".encode())
                log.info("%s; exiting for requeue", stop)
                raise stop


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Runs (or resumes) training as configured; returns the final trainer state. Raises Preempted after
    checkpointing when a preemption signal arrived (see nopetrain/preemption.py), RunDirInUse when another process
    owns run.dir (see nopetrain/ownership.py), PeerFailed when another rank stopped the run (see
    ownership.FailureRecord). Every way out destroys the process group (see parallel.destroy_process_group)."""
    die_with_torchrun_agent()
    # First, so that a signal during start-up is not lost.
    watch = PreemptionWatch()
    env: DistEnv | None = None
    record: FailureRecord | None = None
    peer_watch: threading.Event | None = None
    finished = False
    try:
        env = init_distributed()
        with own_run_dir(Path(cfg.run.dir), env.rank) as incarnation:
            record = FailureRecord(Path(cfg.run.dir), incarnation, env.rank, env.world_size)
            # Until the group is destroyed: a wait on a failed peer in the teardown is bounded too.
            peer_watch = record.watch_peers()
            state = _train(cfg, env, watch)
        finished = True
        return state
    except Preempted:
        watch.hand_over()
        raise
    except BaseException as err:
        stop = err if record is None else record.stop_with(err)
        if stop is not err:
            raise stop from err
        raise
    finally:
        watch.uninstall(stopping=not finished)
        if env is not None:
            destroy_process_group(env)
        if peer_watch is not None:
            peer_watch.set()


def warn_if_over_memory(cfg: TrainConfig, env: DistEnv) -> None:
    """One warning line, before the first step, when the dry run's plan of this run needs more than the GPU has."""
    from nopetrain.plan import device_memory_warning

    properties = torch.cuda.get_device_properties(env.device)
    warning = device_memory_warning(cfg, env.world_size, properties.name, properties.total_memory)
    if warning is not None and env.is_main:
        log.warning(warning)


def _train(cfg: TrainConfig, env: DistEnv, watch: PreemptionWatch) -> dict[str, Any]:
    hf_folder = pretrained_model(cfg)
    validate(cfg, env.world_size)
    set_kernel_backend(cfg.kernels)
    set_attention_backend("auto", deterministic=cfg.deterministic)
    schedule = resolve(cfg, env.world_size)
    setup_logging(env.rank, Path(cfg.run.dir))
    resume = prepare_resume(cfg, env, schedule)
    pretrained = load_hf_state_dict(hf_folder) if hf_folder and resume is None else None
    if pretrained is not None:
        log.info("initialised from %s", hf_folder)
    resize = resume is not None and resume.saved["world_size"] != env.world_size
    if env.device.type == "cuda":
        warn_if_over_memory(cfg, env)
    trainer = Trainer(cfg, env, schedule, pretrained, resize, watch)
    if resume is not None:
        trainer.resume(resume.path, resume.saved, resume.weights_only)
    return trainer.run()
