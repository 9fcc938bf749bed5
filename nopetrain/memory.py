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

A step's peak lies between the weights, optimizer states and activations, together as backward starts, and the sum of
everything: gradients and ZeRO-1/2's bucket fill as backward frees the activations. Not counted: the CUDA context and
NCCL's buffers (around 1 GiB per GPU), ZeRO-3's prefetched parameters beyond the largest layer, the backward pass's
temporaries, allocator fragmentation.
"""

from __future__ import annotations

from dataclasses import dataclass

from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from nopetrain.config import ModelConfig, TrainConfig
from nopetrain.parallel import deepspeed_config

FP32_BYTES = 4
# AdamW's first and second moments, fp32.
ADAM_BYTES = 8
# Per token and vocabulary entry: as backward starts at the loss, the fp32 gradients of the log-softmax and of the
# logits join the saved activations.
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
    activations: int
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
        """Weights, optimizer states and activations, together as backward starts: a lower bound on the peak."""
        return self.states.parameters + self.states.optimizer_states + self.activations


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


def saved_activation_bytes(model: ModelConfig, tokens: int, bf16: bool, fused_prologue: bool) -> int:
    """Bytes autograd keeps for backward at the end of the forward pass of one micro-batch of `tokens` tokens.

    Per token, with w = 2 (bf16) or 4 (fp32) bytes, d = hidden_size, q and kv the query and key/value widths (heads x
    head_dim), I = intermediate_size, V = vocab_size:
      each RMSNorm: 4d (its input in fp32) + w.d (the normed value) + w.d (its output, the next matmul's input) + 4
      each layer: two RMSNorms + w.(2q + 2kv) (attention's q, k, v and output) + 4 x heads (its log-sum-exp)
        + 4w.I (SwiGLU's gate, its SiLU, up and their product) + the q/k prologue's: the fused kernel keeps its
        inputs, w.(q + kv), where it runs (RoPE, QK-norm or a logit scale); the PyTorch reference keeps
        (4 + w).n + 4 x heads for each QK-normed tensor n wide, and for RoPE only the tables
      the model: its layers + the final RMSNorm + 4V (the fp32 log-softmax) + 8 x head_dim (RoPE's fp32 cos and
        sin) + 16 (token ids and labels)
    Flash attention (flash-attn, and SDPA's kernels) keeps no seq x seq scores: there is no term in seq_len^2. Not
    counted: the (batch, seq, seq) mask SDPA gets for document masking or a sliding window without flash-attn."""
    w = 2 if bf16 else FP32_BYTES
    d, head_dim, intermediate = model.hidden_size, model.resolved_head_dim, model.intermediate_size
    q, kv = model.num_heads * head_dim, model.num_kv_heads * head_dim
    norm = FP32_BYTES * d + 2 * w * d + FP32_BYTES
    normed = {"qk": ((q, model.num_heads), (kv, model.num_kv_heads)), "q": ((q, model.num_heads),), "none": ()}
    per_layer = []
    for use_rope in model.rope_layers():
        if fused_prologue:
            runs = use_rope or model.qk_norm != "none" or model.attn_logit_scale != 1.0
            prologue = w * (q + kv) if runs else 0
        else:
            prologue = sum((FP32_BYTES + w) * width + FP32_BYTES * heads for width, heads in normed[model.qk_norm])
        attention = w * (2 * q + 2 * kv) + FP32_BYTES * model.num_heads
        per_layer.append(2 * norm + prologue + attention + 4 * w * intermediate)
    rope_tables = 2 * FP32_BYTES * head_dim if any(model.rope_layers()) else 0
    per_token = sum(per_layer) + norm + FP32_BYTES * model.vocab_size + rope_tables + 16
    return tokens * per_token


def activation_bytes(model: ModelConfig, tokens: int, bf16: bool, fused_prologue: bool) -> int:
    """The activations' peak in a micro-batch of `tokens` tokens: what autograd saves (saved_activation_bytes), and
    the loss's fp32 gradients as backward starts."""
    return saved_activation_bytes(model, tokens, bf16, fused_prologue) + LOSS_GRADIENT_BYTES * tokens * model.vocab_size


def estimate_memory(
    cfg: TrainConfig, world_size: int, params: int, largest_layer: int, activations: int, bf16: bool
) -> MemoryEstimate:
    """Memory per GPU of `cfg` on `world_size` GPUs, given the micro-batch's `activations` (activation_bytes in the
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
