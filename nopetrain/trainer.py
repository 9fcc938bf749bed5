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
import datetime
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
from tqdm import tqdm

from nopetrain import checkpoint
from nopetrain.config import ConfigError, TrainConfig, validate
from nopetrain.curriculum import Phase, Plan, learning_rate, resolve
from nopetrain.data.phased import PhasedStream
from nopetrain.data_pipelines.atomic import write_bytes
from nopetrain.drope import dormant_qk_norm, drop_rope, starts_drope_on_rope_checkpoint
from nopetrain.eval.training import TrainingEval
from nopetrain.exits import NONFINITE, ExitError
from nopetrain.hf import load_hf_state_dict, pretrained_model
from nopetrain.kernels import set_backend as set_kernel_backend
from nopetrain.metrics import MetricsLogger, flops_per_token, memory_gib, peak_tflops, set_aside_rows
from nopetrain.model import count_parameters, lm_loss
from nopetrain.ownership import FailureRecord, die_with_torchrun_agent, own_run_dir
from nopetrain.parallel import (
    DistEnv,
    build_engine,
    destroy_process_group,
    init_distributed,
    use_bf16,
)
from nopetrain.preemption import PREEMPTED_BY_FILE, Preempted, PreemptionWatch

log = logging.getLogger("nopetrain")

# Model keys a resumed run may change; everything else must match the checkpoint's architecture.
RUNTIME_MODEL_KEYS = {"attn_logit_scale", "logit_scale_coef", "train_context"}


class NonFiniteLossError(ExitError, RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""

    exit_code = NONFINITE


class ConsoleHandler(logging.Handler):
    """Writes log lines through tqdm, which clears the progress bar, prints the line and redraws the bar below it,
    so that no line is glued onto the bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging's contract: report, never raise
            self.handleError(record)


def setup_logging(rank: int, run_dir: Path) -> None:
    """Rank 0 logs INFO to the console; every rank logs to run_dir/logs/rank_N.log."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    formatter = logging.Formatter("%(asctime)s rank%(rank)s %(levelname)s %(message)s", "%H:%M:%S")
    console = ConsoleHandler()
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    file = logging.FileHandler(run_dir / "logs" / f"rank_{rank:05d}.log")
    for handler in (console, file):
        handler.setFormatter(formatter)
        handler.addFilter(lambda record: setattr(record, "rank", rank) or True)
    log.handlers[:] = [console, file]
    log.setLevel(logging.INFO)
    log.propagate = False


# Keys that say how this invocation resumes and where the run now lives (a copied or moved run.dir), or what a dry
# run plans for (plan.*), not what the run is: never reported as changed.
INVOCATION_KEYS = {"checkpoint.resume", "checkpoint.rewind", "stop_at_step", "run.dir", "dry_run"}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config dicts as `a.b.c` keys (lists stay values)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changes_the_past(key: str) -> bool:
    """Whether a resumed run with another value of `key` would no longer continue the steps already taken: the
    model's shape, the seed (it orders the shards not read yet), what the data sources are. Phase lengths, weights,
    sequence lengths and batch sizes are judged on the resolved plan instead (see passed_plan)."""
    if key.startswith("model."):
        return key.removeprefix("model.") not in RUNTIME_MODEL_KEYS
    return key in ("seed", "data.kind", "data.successors_per_token") or (
        key.startswith("data.sources.") and key.endswith(".path")
    )


def passed_plan(plan: Plan, step: int) -> str:
    """What the first `step` steps of `plan` ran: each phase begun (its steps up to `step`, sequence length, batch,
    weights) and the DroPE switch if it came before."""
    # Weights sorted by source: a saved config's sources come back from trainer_state.json in sorted order.
    done = [
        f"{phase.name} steps {phase.start + 1}-{min(phase.end, step)} seq_len {phase.seq_len} batch "
        f"{phase.global_batch_size} weights {dict(sorted(phase.weights.items()))}"
        for phase in plan.phases
        if phase.start < step
    ]
    if plan.drope_step is not None and plan.drope_step < step:
        done.append(f"DroPE from step {plan.drope_step + 1}")
    return "; ".join(done)


def saved_config(saved: dict[str, Any]) -> TrainConfig:
    """The config a checkpoint was trained with (`saved`: its trainer state), on today's schema."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), saved["config"]))


def check_resumed_config(saved: dict[str, Any], cfg: TrainConfig, plan: Plan, path: Path) -> None:
    """Compares the config of a resumed run with checkpoint `path`'s (`saved`: its trainer state). Raises ConfigError
    naming the key and both values when a change would rewrite the steps already taken; logs the other changes in one
    warning line."""
    step = saved["step"]
    old, new = flatten(saved["config"]), flatten(dataclasses.asdict(cfg))
    changed = [
        key
        for key, value in new.items()
        if key not in INVOCATION_KEYS and not key.startswith("plan.") and old.get(key) != value
    ]
    for key in changed:
        if changes_the_past(key):
            raise ConfigError(f"{key}={new[key]!r} but checkpoint {path} was trained with {key}={old.get(key)!r}")
    before, now = passed_plan(resolve(saved_config(saved), saved["world_size"]), step), passed_plan(plan, step)
    if before != now:
        raise ConfigError(
            f"the config changes the curriculum's first {step} steps, which checkpoint {path} has run: "
            f"{before} -> {now}"
        )
    if changed:
        log.warning(
            "resuming from %s with a changed config (from step %d on): %s",
            path,
            step + 1,
            ", ".join(f"{key}: {old.get(key)!r} -> {new[key]!r}" for key in changed),
        )


def set_aside_later_steps(run_dir: Path, step: int, rewind: bool) -> None:
    """Moves what run_dir holds beyond `step` into run_dir/rewound/<UTC time>/: the metrics rows logged after it and,
    when rewinding, the newer checkpoints. The resumed run then appends to a history that ends at `step`; nothing is
    deleted. Rank 0 only."""
    folder = run_dir / "rewound" / datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    root = checkpoint.checkpoint_root(run_dir)
    moved = checkpoint.set_aside_newer(root, step, folder / root.name) if rewind else []
    rows = set_aside_rows(run_dir, step, folder)
    if moved or rows:
        log.warning(
            "resuming at step %d: moved %s and %d metrics row(s) of later steps to %s",
            step,
            f"checkpoint(s) {', '.join(moved)}" if moved else "no checkpoint",
            rows,
            folder,
        )


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


def set_lr(engine: Any, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def reset_optimizer_state(engine: Any) -> None:
    """Zeroes AdamW's moments and step counts in place (in every ZeRO partition), as for a fresh optimizer."""
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for param_state in base.state.values():
        for key, value in param_state.items():
            if torch.is_tensor(value):
                value.zero_()
            elif key == "step":
                param_state[key] = 0
    for group in base.param_groups:
        if "step" in group:
            group["step"] = 0


def switch_to_nope(engine: Any, qk_norm: str) -> None:
    """DroPE on the engine's model: every layer NoPE, QK-norm switched on with the gains built in at start."""
    if drop_rope(engine.module, qk_norm):
        raise RuntimeError("DroPE created parameters outside the optimizer; the model lacks its dormant QK-norm")


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        env: DistEnv,
        plan: Plan,
        pretrained: dict[str, Any] | None,
        resize: bool,
        watch: PreemptionWatch,
    ) -> None:
        """`resize`: the run resumes from a checkpoint written by another number of processes."""
        self.cfg, self.env, self.plan, self.watch = cfg, env, plan, watch
        self.run_dir = Path(cfg.run.dir)
        extra_qk_norm = dormant_qk_norm(cfg.curriculum.drope, plan.drope_step)
        self.engine = build_engine(cfg, env, extra_qk_norm, pretrained, load_universal=resize)
        self.resize = resize
        self.bf16 = use_bf16(cfg.precision, env.device)
        self.stream = PhasedStream(cfg, plan, env.rank, env.world_size)
        self.state: dict[str, Any] = {
            "step": 0,
            "tokens_seen": 0,
            "wandb_run_id": uuid.uuid4().hex[:12],
            "drope_step": None,
            "phase": plan.phases[0].name,
        }
        self.config_dict = dataclasses.asdict(cfg)
        self.tokenizer: str | None = None
        self.metrics: MetricsLogger | None = None
        self.phase: Phase | None = None
        self.accumulation = 0
        self.evaluator = TrainingEval(cfg) if cfg.eval.every else None

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
            f"phase {phase.name} ({self.plan.phases.index(phase) + 1}/{len(self.plan.phases)}), steps "
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
            self.tokenizer = copy_tokenizer(self.stream.tokenizer, self.run_dir, cfg.model.vocab_size)
        log.info(
            "model %s: %s parameters, layers with RoPE: %s; %d rank(s) x %d micro-batch(es) of %d sequences, %s",
            cfg.model.name,
            f"{count_parameters(engine.module):,}",
            "".join("R" if layer.attn.use_rope else "N" for layer in engine.module.layers),
            env.world_size,
            self.plan.phase_at(min(state["step"], cfg.steps - 1)).global_batch_size
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
        cfg, env, engine, state, plan = self.cfg, self.env, self.engine, self.state, self.plan
        peak = peak_tflops(env.device, self.bf16, cfg.peak_tflops)
        loss_sum = torch.zeros((), device=env.device)
        finite_micro_batches = torch.zeros((), device=env.device)
        micro_batches = interval_tokens = interval_flops = 0
        skipped_seen, consecutive_skipped = engine.skipped_steps, 0
        interval_start = time.perf_counter()
        while state["step"] < last_step:
            self.watch.start_step()
            step = state["step"]
            if self.phase is None or step >= self.phase.end:
                self.enter_phase(plan.phase_at(step))
            if step == plan.drope_step and state["drope_step"] is None:
                self.drop_positional_encoding()
            lr = learning_rate(plan, cfg, step)
            set_lr(engine, lr)
            for micro in range(self.accumulation):
                # The trainer owns the boundary: DeepSpeed's own counter would misplace it when a phase changes
                # the number of micro-batches per step.
                engine.set_gradient_accumulation_boundary(micro == self.accumulation - 1)
                batch = self.stream.next_batch().to(env.device)
                loss = lm_loss(engine(batch.input_ids, batch.position_ids, batch.segments), batch.labels)
                engine.backward(loss)
                finite = torch.isfinite(loss.detach())
                loss_sum += torch.where(finite, loss.detach(), 0.0)
                finite_micro_batches += finite
            engine.step()
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
                    "phase_index": float(plan.phases.index(self.phase)),
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
    finished = False
    try:
        env = init_distributed()
        with own_run_dir(Path(cfg.run.dir), env.rank) as incarnation:
            record = FailureRecord(Path(cfg.run.dir), incarnation, env.rank, env.world_size)
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


def _train(cfg: TrainConfig, env: DistEnv, watch: PreemptionWatch) -> dict[str, Any]:
    hf_folder = pretrained_model(cfg)
    validate(cfg, env.world_size)
    set_kernel_backend(cfg.kernels)
    plan = resolve(cfg, env.world_size)
    run_dir = Path(cfg.run.dir)
    setup_logging(env.rank, run_dir)
    resume_from = checkpoint.resolve_resume(cfg.checkpoint.resume, run_dir, cfg.checkpoint.rewind)
    saved = checkpoint.read_trainer_state(resume_from) if resume_from is not None else None
    weights_only = False
    if saved is not None:
        check_resumed_config(saved, cfg, plan, resume_from)
        saved_cfg = saved_config(saved)
        saved_drope_step = resolve(saved_cfg, saved["world_size"]).drope_step
        weights_only = starts_drope_on_rope_checkpoint(
            saved_cfg, saved["step"], saved_drope_step, cfg, plan.drope_step, resume_from
        )
        if weights_only and saved["world_size"] != env.world_size:
            raise ConfigError(
                f"checkpoint {resume_from} was written by {saved['world_size']} process(es): start DroPE from it "
                f"with as many (this run has {env.world_size})"
            )
        if env.is_main:
            set_aside_later_steps(run_dir, saved["step"], cfg.checkpoint.rewind)
        dist.barrier()
    pretrained = load_hf_state_dict(hf_folder) if hf_folder and resume_from is None else None
    if pretrained is not None:
        log.info("initialised from %s", hf_folder)
    resize = saved is not None and saved["world_size"] != env.world_size
    trainer = Trainer(cfg, env, plan, pretrained, resize, watch)
    if resume_from is not None:
        trainer.resume(resume_from, saved, weights_only)
    return trainer.run()
