"""A run's plan without running it (`python train.py ... dry_run=true`): the phases with their steps, tokens, sequence
lengths, batch sizes, mixture weights and the learning rate at their boundaries; the DroPE step; the model's
parameters and FLOPs per token; memory per GPU (nopetrain/memory.py); the time at an MFU on a named GPU.

Nothing starts: no process group, no data is read, nothing is written. The model is built on the meta device, so its
parameters are counted exactly, for any size, without memory. The cluster comes from the `plan` keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from nopetrain.config import ConfigError, ModelConfig, TrainConfig, planned_world_size, validate, validate_plan
from nopetrain.curriculum import Phase, Schedule, learning_rate, resolve
from nopetrain.drope import dormant_qk_norm, drop_rope
from nopetrain.hf import pretrained_model
from nopetrain.metrics import GPUS, flops_per_token, gpu_spec, named_peak_tflops
from nopetrain.model import Transformer, count_parameters

if TYPE_CHECKING:
    from nopetrain.memory import MemoryEstimate, MemoryVerdict

GIB = 2**30


@dataclass(frozen=True)
class PhasePlan:
    phase: Phase
    tokens: int
    accumulation: int  # micro-batches per GPU and optimizer step
    lr_first: float  # at the phase's first step
    lr_last: float  # at its last step
    flops_per_token: float  # at its sequence length, with the model as it starts the phase


@dataclass(frozen=True)
class RunPlan:
    cfg: TrainConfig
    world_size: int
    curriculum: Schedule
    phases: tuple[PhasePlan, ...]
    parameters: int
    largest_layer: int  # parameters of the largest module, which ZeRO-3 gathers whole
    bf16: bool
    tokens: int
    flops: float  # training FLOPs of the whole run
    memory: MemoryEstimate
    memory_phase: Phase  # the phase whose micro-batch needs the most activation memory
    verdict: MemoryVerdict | None  # None where plan.gpu's memory is unknown
    peak_tflops: float  # of one GPU
    seconds: float  # at plan.mfu on plan.world_size GPUs


def gpu_peak_tflops(cfg: TrainConfig, bf16: bool) -> float:
    """peak_tflops, else the table's peak for plan.gpu; ConfigError naming plan.gpu when it is not in the table."""
    peak = cfg.peak_tflops if cfg.peak_tflops is not None else named_peak_tflops(cfg.plan.gpu, bf16)
    if peak is None:
        known = ", ".join(name for name, _ in GPUS)
        raise ConfigError(f"plan.gpu={cfg.plan.gpu!r} has no known peak ({known}); set peak_tflops")
    return peak


def planned_bf16(cfg: TrainConfig) -> bool:
    """Every GPU of the table computes in bf16: precision=auto means bf16 there."""
    return cfg.precision != "fp32"


def largest_module_parameters(model: nn.Module) -> int:
    """Parameters of the module that holds the most of its own, as DeepSpeed's ZeRO-3 estimator counts them."""
    return max(sum(p.numel() for p in module.parameters(recurse=False)) for module in model.modules())


def phase_flops(phase: Phase, drope_step: int | None, model: ModelConfig, dropped: ModelConfig) -> float:
    """Training FLOPs of `phase`, with `dropped` (the NoPE model) from the DroPE step on."""
    switch = phase.end if drope_step is None else min(max(drope_step, phase.start), phase.end)
    tokens_per_step = phase.global_batch_size * phase.seq_len
    before = (switch - phase.start) * tokens_per_step * flops_per_token(model, phase.seq_len)
    after = (phase.end - switch) * tokens_per_step * flops_per_token(dropped, phase.seq_len)
    return before + after


@dataclass(frozen=True)
class ModelsTrained:
    """The model's shapes as a run trains them: counted once, for the plan and any change of its memory settings."""

    parameters: int
    largest_layer: int
    rope: ModelConfig  # the model as configured
    dropped: ModelConfig  # the model after the DroPE switch (every layer NoPE, its QK-norm on)
    by_phase: tuple[tuple[Phase, tuple[ModelConfig, ...]], ...]  # the models each phase trains


def models_trained(cfg: TrainConfig, curriculum: Schedule) -> ModelsTrained:
    extra_qk_norm = dormant_qk_norm(cfg.curriculum.drope, curriculum.drope_step)
    with torch.device("meta"):
        model = Transformer(dataclasses.replace(cfg.model), extra_qk_norm)
    parameters, largest_layer = count_parameters(model), largest_module_parameters(model)
    drop_rope(model, cfg.curriculum.drope.qk_norm)
    drope_step = curriculum.drope_step
    by_phase = []
    for phase in curriculum.phases:
        # The RoPE model before the DroPE step, the NoPE one from it on.
        rope = drope_step is None or phase.start < drope_step
        nope = drope_step is not None and drope_step < phase.end
        by_phase.append((phase, tuple(m for m, trained in ((cfg.model, rope), (model.config, nope)) if trained)))
    return ModelsTrained(parameters, largest_layer, cfg.model, model.config, tuple(by_phase))


def make_plan(cfg: TrainConfig) -> RunPlan:
    """The plan of `cfg` on the `plan` keys' cluster; raises ConfigError, naming the key, on everything a real start
    would refuse for the config (validate, resolve), before DeepSpeed is imported."""
    world_size = planned_world_size(cfg)
    validate_plan(cfg.plan, world_size)
    pretrained_model(cfg)
    validate(cfg, world_size)
    curriculum = resolve(cfg, world_size)
    bf16 = planned_bf16(cfg)
    peak = gpu_peak_tflops(cfg, bf16)
    # Imported once the config has passed: DeepSpeed takes seconds to import and logs as it does.
    from nopetrain.memory import memory_verdict, plan_memory

    models = models_trained(cfg, curriculum)
    phases = [
        PhasePlan(
            phase=phase,
            tokens=(phase.end - phase.start) * phase.global_batch_size * phase.seq_len,
            accumulation=phase.global_batch_size // (cfg.micro_batch_size * world_size),
            lr_first=learning_rate(curriculum, cfg, phase.start),
            lr_last=learning_rate(curriculum, cfg, phase.end - 1),
            flops_per_token=flops_per_token(trained[0], phase.seq_len),
        )
        for phase, trained in models.by_phase
    ]
    flops = sum(phase_flops(p.phase, curriculum.drope_step, models.rope, models.dropped) for p in phases)
    memory, memory_phase = plan_memory(cfg, world_size, models, bf16)
    return RunPlan(
        cfg=cfg,
        world_size=world_size,
        curriculum=curriculum,
        phases=tuple(phases),
        parameters=models.parameters,
        largest_layer=models.largest_layer,
        bf16=bf16,
        tokens=sum(p.tokens for p in phases),
        flops=flops,
        memory=memory,
        memory_phase=memory_phase,
        verdict=memory_verdict(cfg, world_size, models, bf16, cfg.plan.gpu, gpu_memory_bytes(cfg)),
        peak_tflops=peak,
        seconds=flops / (peak * 1e12 * cfg.plan.mfu * world_size),
    )


def gpu_memory_bytes(cfg: TrainConfig) -> int | None:
    """plan.gpu_memory_gib, else the GPU table's memory for plan.gpu; None where neither says."""
    if cfg.plan.gpu_memory_gib is not None:
        return round(cfg.plan.gpu_memory_gib * GIB)
    spec = gpu_spec(cfg.plan.gpu)
    return None if spec is None else round(spec.memory_gib * GIB)


def device_memory_warning(cfg: TrainConfig, world_size: int, device_name: str, capacity: int) -> str | None:
    """At a GPU start: one line when the plan of `cfg` on `world_size` GPUs needs more than the device's `capacity`
    bytes (with the smallest change that fits), else None."""
    from nopetrain.memory import memory_verdict

    curriculum = resolve(cfg, world_size)
    models = models_trained(cfg, curriculum)
    verdict = memory_verdict(cfg, world_size, models, planned_bf16(cfg), device_name, capacity)
    return None if verdict.fits else f"the memory plan says this run will not fit: {verdict.line()}"


def _count(value: float) -> str:
    """1234567 -> 1.23M: token and FLOP counts at a glance."""
    for factor, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{suffix}"
    return f"{value:.3g}"


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        indent + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    ]


def _duration(seconds: float) -> str:
    hours = seconds / 3600
    if hours >= 48:
        return f"{hours / 24:.3g} days ({hours:,.0f} h)"
    return f"{hours:.3g} h" if hours >= 1 else f"{seconds / 60:.3g} min"


def _size(size: int) -> str:
    return f"{size / GIB:.3g} GiB" if size >= GIB / 10 else f"{size / 2**20:.3g} MiB"


def _gpus(count: int) -> str:
    return f"{count} GPU" + ("s" if count > 1 else "")


def _zero(cfg: TrainConfig) -> str:
    ds = cfg.deepspeed
    offload = [name for name, on in (("optimizer", ds.offload_optimizer), ("params", ds.offload_params)) if on]
    return f"ZeRO-{ds.stage}" + (f" (offload {', '.join(offload)})" if offload else "")


def _phase_table(plan: RunPlan) -> list[str]:
    header = ["#", "phase", "steps", "tokens", "seq_len", "batch", "accum", "LR first", "LR last", "FLOPs/token"]
    rows = [[*header, "weights"]]
    for index, p in enumerate(plan.phases, 1):
        weights = " ".join(f"{name}={weight:.3g}" for name, weight in p.phase.weights.items())
        rows.append(
            [
                str(index),
                p.phase.name,
                f"{p.phase.start + 1}-{p.phase.end}",
                _count(p.tokens),
                str(p.phase.seq_len),
                str(p.phase.global_batch_size),
                str(p.accumulation),
                f"{p.lr_first:.3g}",
                f"{p.lr_last:.3g}",
                _count(p.flops_per_token),
                weights or "-",
            ]
        )
    return _table(rows, indent="")


def _drope_line(plan: RunPlan) -> str:
    step, drope = plan.curriculum.drope_step, plan.cfg.curriculum.drope
    if step is None:
        return "DroPE: none"
    recalibration = f"recalibration to {drope.lr:.3g}" if drope.lr is not None else "main schedule"
    return (
        f"DroPE: RoPE dropped from all {plan.cfg.model.num_layers} layers before step {step + 1} (phase "
        f"{plan.curriculum.phase_at(step).name}), qk_norm={drope.qk_norm}, LR there "
        f"{learning_rate(plan.curriculum, plan.cfg, step):.3g} ({recalibration}), "
        f"optimizer {'reset' if drope.reset_optimizer else 'kept'}"
    )


def _memory_lines(plan: RunPlan) -> list[str]:
    from nopetrain.memory import ALLOWANCE_BYTES, FRAGMENTATION

    memory, states, ds = plan.memory, plan.memory.states, plan.cfg.deepspeed
    precision = "bf16" if plan.bf16 else "fp32"
    share = f"1/{plan.world_size}"
    gathered = " + the largest layer gathered" if ds.stage == 3 else ""
    weights = ("whole" if ds.stage < 3 else "offloaded" if ds.offload_params else share) + gathered
    grads = ("whole" if ds.stage == 1 else "offloaded" if ds.offload_optimizer else share) + gathered
    fp32_states = "offloaded" if ds.offload_optimizer else share
    micro = f"micro-batch {plan.cfg.micro_batch_size} x {plan.memory_phase.seq_len} tokens"
    ac, chunk = plan.cfg.activation_checkpointing, plan.cfg.loss.chunk_tokens
    blocks = f"blocks 0, {ac.every}, ..." if ac.every > 1 else "every block"
    recompute = {
        "none": "no recompute",
        "full": "every block recomputed",
        "selective": f"{blocks} recomputed, keeping {'matmuls' if ac.policy == 'ops' else 'inputs only'}",
    }[ac.mode]
    loss = f"loss in chunks of {chunk} tokens" if chunk else "whole fp32 logits"
    rows = [
        ["parameters", _size(states.parameters), f"{precision} weights {weights}; fp32 master weights {fp32_states}"],
        ["gradients", _size(states.gradients), f"{precision} gradients {grads}; fp32 gradients {fp32_states}"],
        ["optimizer states", _size(states.optimizer_states), f"AdamW's fp32 moments {fp32_states}"],
        ["reduce bucket", _size(memory.reduce_bucket), "DeepSpeed's reduce_bucket_size"],
        [
            "activations",
            _size(memory.activations.peak),
            f"{micro} (phase {plan.memory_phase.name}), {recompute}, {loss}",
        ],
        ["total", _size(memory.total), "everything at once: an upper bound on a step's peak"],
        ["", "", f"at least {_size(memory.floor)}: weights, optimizer states and the activations' peak"],
    ]
    lines = [f"memory per GPU ({_zero(plan.cfg)}, {precision}, {_gpus(plan.world_size)}):", *_table(rows)]
    lines.append(
        f"  not counted, allowed for in the verdict: the CUDA context and NCCL's buffers ({ALLOWANCE_BYTES / GIB:g} "
        f"GiB), fragmentation ({FRAGMENTATION:.0%} of the total)"
    )
    if memory.deepspeed_gpu is None:
        lines.append(f"  DeepSpeed has no estimator for ZeRO-{ds.stage} in {precision}: derived the same way")
    else:
        ours = states.parameters + states.gradients + states.optimizer_states
        left_out = "; it leaves out the bf16 weights' partition" if ds.stage == 3 and not ds.offload_optimizer else ""
        lines.append(
            f"  DeepSpeed's estimator: {_size(memory.deepspeed_gpu)} of model states per GPU (above: {_size(ours)}"
            f"{left_out}), {_size(memory.deepspeed_cpu_per_node)} of CPU memory per node"
        )
    if plan.verdict is None:
        return [
            *lines,
            f"memory verdict: unknown: no memory size for plan.gpu={plan.cfg.plan.gpu!r}; set plan.gpu_memory_gib",
        ]
    return [*lines, plan.verdict.line()]


def format_plan(plan: RunPlan) -> str:
    """The plan as the dry run prints it."""
    cfg = plan.cfg
    precision = "bf16" if plan.bf16 else "fp32"
    nodes = max(1, plan.world_size // cfg.plan.gpus_per_node)
    peak_source = "peak_tflops" if cfg.peak_tflops is not None else f"{cfg.plan.gpu} {precision}"
    layers = "".join("R" if rope else "N" for rope in cfg.model.rope_layers())
    return "\n".join(
        [
            f"plan: {cfg.run.name}, {cfg.steps:,} steps on {plan.world_size} x {cfg.plan.gpu} in {nodes} node(s), "
            f"{_zero(cfg)}, {precision}, micro-batch {cfg.micro_batch_size}",
            f"model {cfg.model.name}: {plan.parameters:,} parameters (largest layer {plan.largest_layer:,}), "
            f"layers {layers} (R: RoPE, N: NoPE)",
            "",
            *_phase_table(plan),
            _drope_line(plan),
            f"tokens: {_count(plan.tokens)} ({plan.tokens:,}); training FLOPs: {plan.flops:.3g}",
            "",
            *_memory_lines(plan),
            "",
            f"time: {_duration(plan.seconds)} at {cfg.plan.mfu:.0%} MFU of {plan.peak_tflops:g} TFLOP/s "
            f"({peak_source}) x {_gpus(plan.world_size)}",
        ]
    )
