"""Memory per GPU of a planned run, from the model's shape and the DeepSpeed config; nothing is allocated.

Model states are counted per parameter as DeepSpeed's own estimators count them (estimate_zero2_ and
estimate_zero3_model_states_mem_needs, whose results are reported beside ours): the working weights and their
gradients (2 bytes each in bf16), whole on every GPU or partitioned over the N GPUs as the stage says; fp32 master
weights (4), fp32 gradients (4) and AdamW's two moments (8), partitioned; under ZeRO-3 also the largest layer's weights
and gradients, gathered whole. Where ours differ: DeepSpeed's ZeRO-3 estimator leaves out the bf16 weights' own
partition, which a real engine holds (2 bytes per parameter / N beside the 18 it counts), and it covers neither ZeRO-1
(gradients whole on every GPU) nor fp32 training (4-byte weights and gradients, and the fp32 master copy all the same):
those are derived the same way. Offloading moves the fp32 states and the gradients' partitions (with offload_params
the weights' partitions too) to CPU memory.

DeepSpeed also allocates a gradient reduce bucket of `reduce_bucket_size` elements (5e8 unless deepspeed.extra sets
it) whatever the model's size: during backward on ZeRO-1 and 2 (two with overlap_comm), from the start on ZeRO-3.

Activations depend on activation checkpointing (what each block keeps, and one block made again in backward) and on
the loss (the whole fp32 logits, or one chunk's): `activation_memory`. A step's peak lies between the weights,
optimizer states and the activations' peak, together, and the sum of everything: gradients and ZeRO-1/2's bucket fill
as backward frees the activations. Not counted: the CUDA context and NCCL's buffers (around 1 GiB per GPU), ZeRO-3's
prefetched parameters beyond the largest layer, the backward pass's temporaries, allocator fragmentation; the verdict
against a GPU's memory (`memory_verdict`) allows for them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from nopetrain.activation_checkpointing import checkpointed_blocks
from nopetrain.config import ActivationCheckpointingConfig, ModelConfig, TrainConfig
from nopetrain.curriculum import Phase
from nopetrain.parallel import deepspeed_config

if TYPE_CHECKING:
    from nopetrain.plan import ModelsTrained

GIB = 2**30

FP32_BYTES = 4
# AdamW's first and second moments, fp32.
ADAM_BYTES = 8
# Per token and vocabulary entry: as backward starts at the plain loss, the fp32 gradients of the log-softmax and of
# the logits join the saved activations.
LOSS_GRADIENT_BYTES = 8


@dataclass(frozen=True)
class ModelStates:
    """Bytes on one GPU."""

    parameters: int  # working weights (and ZeRO-3's gathered largest layer) and the fp32 master weights
    gradients: int  # working gradients (and the gathered layer's) and their fp32 partition
    optimizer_states: int


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on one GPU, except deepspeed_cpu_per_node."""

    states: ModelStates
    reduce_bucket: int
    activations: ActivationMemory
    # DeepSpeed's estimator's model states on one GPU and in one node's CPU memory, None where it has none (ZeRO-1,
    # fp32).
    deepspeed_gpu: int | None
    deepspeed_cpu_per_node: int | None

    @property
    def total(self) -> int:
        """Everything at once: an upper bound on a step's peak."""
        return self.floor + self.states.gradients + self.reduce_bucket

    @property
    def floor(self) -> int:
        """Weights, optimizer states and the activations' peak, together: a lower bound on a step's peak."""
        return self.states.parameters + self.states.optimizer_states + self.activations.peak


def model_states(
    params: int,
    largest_layer: int,
    stage: int,
    bf16: bool,
    world_size: int,
    offload_optimizer: bool = False,
    offload_params: bool = False,
) -> ModelStates:
    """ZeRO's model states on one GPU of `world_size` for `params` parameters whose largest layer (module) holds
    `largest_layer` of them."""
    working_bytes = 2 if bf16 else FP32_BYTES
    shard = params / world_size
    weights = params if stage < 3 else (0 if offload_params else shard)
    grads = params if stage == 1 else (0 if offload_optimizer else shard)
    gathered = largest_layer if stage == 3 else 0
    # The fp32 master weights, fp32 gradients and AdamW's moments of this GPU's partition, unless offloaded.
    fp32_shard = 0 if offload_optimizer else shard
    return ModelStates(
        parameters=round(working_bytes * (weights + gathered) + FP32_BYTES * fp32_shard),
        gradients=round(working_bytes * (grads + gathered) + FP32_BYTES * fp32_shard),
        optimizer_states=round(ADAM_BYTES * fp32_shard),
    )


def deepspeed_estimate(
    params: int,
    largest_layer: int,
    stage: int,
    world_size: int,
    gpus_per_node: int,
    offload_optimizer: bool,
    offload_params: bool,
) -> tuple[int, int] | None:
    """DeepSpeed's own estimate of 16-bit training's model states, (GPU bytes per GPU, CPU bytes per node), for
    ZeRO-2 and 3; None for ZeRO-1, which it does not estimate."""
    nodes = max(1, world_size // gpus_per_node)
    per_node = min(world_size, gpus_per_node)
    if stage == 2:
        cpu, gpu = estimate_zero2_model_states_mem_needs(params, per_node, nodes, cpu_offload=offload_optimizer)
        return gpu, cpu
    if stage == 3:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            params, largest_layer, per_node, nodes, cpu_offload=offload_optimizer, cpu_offload_params=offload_params
        )
        return gpu, cpu
    return None


def reduce_bucket_bytes(cfg: TrainConfig, bf16: bool) -> int:
    """DeepSpeed's gradient reduce bucket(s), from its own reading of the ZeRO section of our DeepSpeed config."""
    zero = DeepSpeedZeroConfig(**deepspeed_config(cfg, 1, bf16, cpu=False)["zero_optimization"])
    contiguous = zero.contiguous_gradients or (cfg.deepspeed.stage < 3 and cfg.deepspeed.offload_optimizer)
    if not contiguous:
        return 0
    # ZeRO-1 and 2 double-buffer the bucket when reduction overlaps backward; ZeRO-3 keeps one.
    buffers = 2 if zero.overlap_comm and cfg.deepspeed.stage < 3 else 1
    return buffers * zero.reduce_bucket_size * (2 if bf16 else FP32_BYTES)


@dataclass(frozen=True)
class ActivationMemory:
    """Bytes of one micro-batch's activations on one GPU, by what holds them."""

    blocks: int  # kept by the blocks for backward (where recomputed: their inputs and the outputs a policy keeps)
    rest: int  # kept by the final norm, RoPE's tables, token ids and labels
    loss_kept: int  # kept by the loss for backward: the fp32 log-softmax, or the chunked loss's gradients
    loss_transient: int  # the loss's largest extra: its gradients as backward starts, or one chunk's working set
    recompute: int  # the largest recomputed block's activations, made again in backward

    @property
    def kept(self) -> int:
        """What autograd holds when the forward ends."""
        return self.blocks + self.rest + self.loss_kept

    @property
    def peak(self) -> int:
        """The most at once: the loss's extra on top of everything kept, or later in backward (the loss's share
        freed) one recomputed block's."""
        return self.blocks + self.rest + max(self.loss_kept + self.loss_transient, self.recompute)


def activation_memory(
    model: ModelConfig,
    tokens: int,
    bf16: bool,
    fused_prologue: bool,
    recompute: list[str | None] | None = None,
    loss_chunk_tokens: int = 0,
) -> ActivationMemory:
    """The activations of one micro-batch of `tokens` tokens; `recompute` per block as
    activation_checkpointing.checkpointed_blocks gives it (None: nothing recomputed).

    Per token, with w = 2 (bf16) or 4 (fp32) bytes, d = hidden_size, q and kv the query and key/value widths (heads x
    head_dim), I = intermediate_size, V = vocab_size:
      each RMSNorm: 4d (its input in fp32) + w.d (the normed value) + w.d (its output, the next matmul's input) + 4
      a block kept whole: two RMSNorms + w.(2q + 2kv) (attention's q, k, v and output) + 4 x heads (its log-sum-exp)
        + 4w.I (SwiGLU's gate, its SiLU, up and their product) + the q/k prologue's: the fused kernel keeps its
        inputs, w.(q + kv), where it runs (RoPE, QK-norm or a logit scale); the PyTorch reference keeps
        (4 + w).n + 4 x heads for each QK-normed tensor n wide, and for RoPE only the tables
      a block recomputed whole ("block"): its input, w.d; the whole block again while its backward runs
      a block keeping its matmuls and attention ("ops"): its input w.d, the seven projections' outputs
        w.(q + 2kv + 2d + 2I), attention's output and log-sum-exp w.q + 4 x heads
      the rest: the final RMSNorm but its output + 8 x head_dim (RoPE's fp32 cos and sin) + 16 (token ids, labels)
      the plain loss: w.d (the head's input, the final norm's output) and 4V (the fp32 log-softmax) kept, 8V more as
        backward starts (its and the logits' fp32 gradients)
      the chunked loss (c tokens a chunk): w.d kept (the hidden states' gradient) and, once per micro-batch, the
        weight's gradient w.V.d; while it runs, one chunk's fp32 logits 4c.V, in bf16 also its bf16 logits and
        gradient 2c.V, the weight's fp32 sum 4V.d and one chunk's bf16 product 2V.d
    Flash attention (flash-attn, and SDPA's kernels) keeps no seq x seq scores: there is no term in seq_len^2. Not
    counted: the (batch, seq, seq) mask SDPA gets for document masking or a sliding window without flash-attn."""
    w = 2 if bf16 else FP32_BYTES
    d, head_dim, intermediate = model.hidden_size, model.resolved_head_dim, model.intermediate_size
    vocab = model.vocab_size
    q, kv = model.num_heads * head_dim, model.num_kv_heads * head_dim
    norm = FP32_BYTES * d + 2 * w * d + FP32_BYTES
    normed = {"qk": ((q, model.num_heads), (kv, model.num_kv_heads)), "q": ((q, model.num_heads),), "none": ()}
    kept_by_ops = w * (d + q + 2 * kv + 2 * d + 2 * intermediate + q) + FP32_BYTES * model.num_heads
    blocks, recomputed = 0, [0]
    for use_rope, policy in zip(model.rope_layers(), recompute or [None] * model.num_layers, strict=True):
        if fused_prologue:
            runs = use_rope or model.qk_norm != "none" or model.attn_logit_scale != 1.0
            prologue = w * (q + kv) if runs else 0
        else:
            prologue = sum((FP32_BYTES + w) * width + FP32_BYTES * heads for width, heads in normed[model.qk_norm])
        attention = w * (2 * q + 2 * kv) + FP32_BYTES * model.num_heads
        whole = 2 * norm + prologue + attention + 4 * w * intermediate
        blocks += {None: whole, "block": w * d, "ops": kept_by_ops}[policy]
        if policy is not None:
            recomputed.append(whole)
    rope_tables = 2 * FP32_BYTES * head_dim if any(model.rope_layers()) else 0
    rest = norm - w * d + rope_tables + 16
    if loss_chunk_tokens <= 0:
        loss_kept, loss_transient = (w * d + FP32_BYTES * vocab) * tokens, LOSS_GRADIENT_BYTES * vocab * tokens
    else:
        chunk = min(loss_chunk_tokens, tokens)
        loss_kept = w * d * tokens + w * vocab * d
        loss_transient = (FP32_BYTES + (2 if bf16 else 0)) * chunk * vocab
        if bf16:
            loss_transient += (FP32_BYTES + 2) * vocab * d
    return ActivationMemory(
        blocks=tokens * blocks,
        rest=tokens * rest,
        loss_kept=loss_kept,
        loss_transient=loss_transient,
        recompute=tokens * max(recomputed),
    )


def estimate_memory(
    cfg: TrainConfig, world_size: int, params: int, largest_layer: int, activations: ActivationMemory, bf16: bool
) -> MemoryEstimate:
    """Memory per GPU of `cfg` on `world_size` GPUs, given the micro-batch's `activations` (activation_memory in the
    phase that needs the most)."""
    ds = cfg.deepspeed
    deepspeed = None
    if bf16:
        deepspeed = deepspeed_estimate(
            params, largest_layer, ds.stage, world_size, cfg.plan.gpus_per_node, ds.offload_optimizer, ds.offload_params
        )
    return MemoryEstimate(
        states=model_states(params, largest_layer, ds.stage, bf16, world_size, ds.offload_optimizer, ds.offload_params),
        reduce_bucket=reduce_bucket_bytes(cfg, bf16),
        activations=activations,
        deepspeed_gpu=deepspeed[0] if deepspeed else None,
        deepspeed_cpu_per_node=deepspeed[1] if deepspeed else None,
    )


def plan_memory(cfg: TrainConfig, world_size: int, models: ModelsTrained, bf16: bool) -> tuple[MemoryEstimate, Phase]:
    """Memory per GPU of `cfg` on `world_size` GPUs, with the activations of the phase and model (RoPE before the
    DroPE switch, NoPE after) whose micro-batch needs the most; and that phase."""
    # On a GPU the q/k prologue is the fused Triton kernel, unless kernels=torch asks for the PyTorch reference.
    fused = cfg.kernels != "torch"
    recompute = checkpointed_blocks(cfg.activation_checkpointing, cfg.model.num_layers)
    candidates = []
    for phase, trained in models.by_phase:
        tokens = cfg.micro_batch_size * phase.seq_len
        for model in trained:
            memory = activation_memory(model, tokens, bf16, fused, recompute, cfg.loss.chunk_tokens)
            candidates.append((memory, phase))
    activations, phase = max(candidates, key=lambda candidate: candidate[0].peak)
    return estimate_memory(cfg, world_size, models.parameters, models.largest_layer, activations, bf16), phase


# What the plan does not count, added to its upper bound before it is compared with a GPU's memory: the CUDA context
# with cuBLAS's and NCCL's buffers (a fixed 2 GiB; the context alone is 0.5-1 GiB on an H100) and the caching
# allocator's fragmentation (5% of the plan).
ALLOWANCE_BYTES = 2 * GIB
FRAGMENTATION = 0.05
# The loss's chunk a suggested fix uses: 1,024 tokens of SmolLM3's 128,256-piece vocabulary are 0.5 GiB of fp32
# logits, a chunk's matmuls still large enough to keep a GPU busy.
SUGGESTED_CHUNK_TOKENS = 1024


@dataclass(frozen=True)
class MemoryVerdict:
    gpu: str
    capacity: int  # bytes of one GPU
    need: int  # the plan's upper bound and the allowance
    # The smallest change that fits, as train.py overrides, where it does not fit (None where nothing tried fits).
    fix: list[str] | None

    @property
    def fits(self) -> bool:
        return self.need <= self.capacity

    def line(self) -> str:
        where = f"{self.capacity / GIB:.0f} GiB of {self.gpu}"
        if self.fits:
            return f"memory verdict: fits in {where} (needs {self.need / GIB:.3g} GiB)"
        change = (
            f"smallest change that fits: {' '.join(self.fix)}"
            if self.fix
            else "no change of activation checkpointing, loss chunks, micro-batch or ZeRO stage fits: more GPUs or a "
            "shorter sequence"
        )
        return f"memory verdict: does not fit in {where} (needs {self.need / GIB:.3g} GiB); {change}"


def needed_bytes(memory: MemoryEstimate) -> int:
    """The plan's upper bound with the allowance for what it does not count."""
    return round(memory.total * (1 + FRAGMENTATION)) + ALLOWANCE_BYTES


def memory_verdict(
    cfg: TrainConfig, world_size: int, models: ModelsTrained, bf16: bool, gpu: str, capacity: int | None
) -> MemoryVerdict | None:
    """Whether `cfg` fits `capacity` bytes per GPU (None where unknown) and, where it does not, the first change of a
    ladder that does, each rung keeping the ones before it: the loss in chunks (costs nothing: the same FLOPs),
    selective activation checkpointing (recomputes the element-wise ops), full (one more forward), the micro-batch
    halved while the global batch allows (more accumulation steps), ZeRO-3 (weights partitioned, gathered each
    layer), the optimizer offloaded to CPU memory."""
    if capacity is None:
        return None

    def need(candidate: TrainConfig) -> int:
        return needed_bytes(plan_memory(candidate, world_size, models, bf16)[0])

    required = need(cfg)
    if required <= capacity:
        return MemoryVerdict(gpu, capacity, required, None)
    for overrides, candidate in _fix_ladder(cfg, world_size, models):
        if need(candidate) <= capacity:
            return MemoryVerdict(gpu, capacity, required, overrides)
    return MemoryVerdict(gpu, capacity, required, None)


def _fix_ladder(cfg: TrainConfig, world_size: int, models: ModelsTrained):
    """(overrides, config) for each rung of memory_verdict's ladder, cumulative, skipping what cfg already has."""
    overrides: list[str] = []

    def change(candidate: TrainConfig, *keys: str) -> tuple[list[str], TrainConfig]:
        overrides.extend(keys)
        return list(overrides), candidate

    if cfg.loss.chunk_tokens == 0:
        cfg = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, chunk_tokens=SUGGESTED_CHUNK_TOKENS))
        yield change(cfg, f"loss.chunk_tokens={SUGGESTED_CHUNK_TOKENS}")
    if cfg.activation_checkpointing.mode == "none":
        cfg = dataclasses.replace(cfg, activation_checkpointing=ActivationCheckpointingConfig("selective", 1, "ops"))
        yield change(cfg, "activation_checkpointing.mode=selective")
    if cfg.activation_checkpointing.mode != "full":
        cfg = dataclasses.replace(cfg, activation_checkpointing=ActivationCheckpointingConfig("full"))
        overrides[:] = [o for o in overrides if not o.startswith("activation_checkpointing.")]
        yield change(cfg, "activation_checkpointing.mode=full")
    batches = [phase.global_batch_size for phase, _ in models.by_phase]
    micro_batch = cfg.micro_batch_size // 2
    while micro_batch >= 1:
        if all(batch % (micro_batch * world_size) == 0 for batch in batches):
            cfg = dataclasses.replace(cfg, micro_batch_size=micro_batch)
            overrides[:] = [o for o in overrides if not o.startswith("micro_batch_size=")]
            yield change(cfg, f"micro_batch_size={micro_batch}")
        micro_batch //= 2
    if cfg.deepspeed.stage < 3:
        cfg = dataclasses.replace(cfg, deepspeed=dataclasses.replace(cfg.deepspeed, stage=3))
        yield change(cfg, "deepspeed.stage=3")
    if not cfg.deepspeed.offload_optimizer:
        cfg = dataclasses.replace(cfg, deepspeed=dataclasses.replace(cfg.deepspeed, offload_optimizer=True))
        yield change(cfg, "deepspeed.offload_optimizer=true")
