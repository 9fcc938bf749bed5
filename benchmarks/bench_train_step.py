"""Training-step throughput (tokens/s, MFU) of smollm_360m and smollm_1p7b on one CUDA GPU in bf16, with the fused
Triton q/k prologue against the PyTorch reference, and flash-attn against SDPA where flash-attn is installed.

    python benchmarks/bench_train_step.py [--models smollm_360m smollm_1p7b] [--seq-len 2048] [--micro-batch 4]
        [--qk-norm none qk] [--steps 10] [--peak-tflops 989]

Each setting builds the model from its preset (configs/model/<name>.yaml) with nopetrain.model.Transformer, in bf16
with plain torch AdamW (no DeepSpeed, no fp32 master weights), and times full steps (forward, fp32 loss, backward,
optimizer) after warm-up steps. Batches are random tokens packed as documents (positions restart, document masking
on, as the trainer does by default). `--qk-norm qk` adds per-head QK-norm gains (the DroPE setting), where the fused
prologue does the most work; the presets themselves have none. MFU uses nopetrain.metrics' FLOPs per token and
device peak. Results go to benchmarks/results/train_step-<device>-<date>.md. Needs CUDA.

Backends are chosen through nopetrain.kernels.set_backend("triton" | "torch") for the prologue and
nopetrain.kernels.set_attention_backend("flash" | "sdpa") for attention.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import time

import numpy as np
import torch
from bench_qk_norm_rope import REPO, require_cuda, write_results  # sibling script: shared results header
from omegaconf import OmegaConf

from nopetrain import kernels
from nopetrain.config import ModelConfig
from nopetrain.data import batch_from_chunks
from nopetrain.metrics import flops_per_token, peak_tflops
from nopetrain.model import Transformer


def preset(name: str, qk_norm: str) -> ModelConfig:
    values = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "model" / f"{name}.yaml"))
    return dataclasses.replace(ModelConfig(**values), qk_norm=qk_norm)


def random_batch(cfg: ModelConfig, micro_batch: int, seq_len: int, rng: np.random.Generator):
    """Random tokens as packed documents of 100-2000 tokens, through the loader's own batch builder."""
    chunks = rng.integers(0, cfg.vocab_size, (micro_batch, seq_len + 1))
    starts = [np.cumsum(rng.integers(100, 2000, seq_len // 100)) for _ in range(micro_batch)]
    batch = batch_from_chunks(chunks, starts, document_masking=True)
    return (
        batch.input_ids.cuda(),
        batch.labels.cuda(),
        batch.position_ids.cuda(),
        batch.segments.to(torch.device("cuda")),
    )


def step_seconds(cfg: ModelConfig, micro_batch: int, seq_len: int, warmup: int, steps: int) -> float:
    """Mean wall time of one full training step, after `warmup` steps."""
    torch.manual_seed(0)
    # Built on the GPU in bf16: no fp32 copy on the host first (seconds per model on a GPU machine's CPU).
    with torch.device("cuda"):
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = Transformer(cfg)
        finally:
            torch.set_default_dtype(default_dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    batches = [random_batch(cfg, micro_batch, seq_len, np.random.default_rng(i)) for i in range(4)]

    def step(i: int) -> None:
        input_ids, labels, position_ids, segments = batches[i % len(batches)]
        model(input_ids, position_ids, segments, labels=labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(warmup):
        step(i)
    torch.cuda.synchronize()
    begin = time.perf_counter()
    for i in range(steps):
        step(i)
    torch.cuda.synchronize()
    return (time.perf_counter() - begin) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm_360m", "smollm_1p7b"])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--qk-norm", nargs="+", default=["none", "qk"], choices=["none", "q", "qk"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak (default: device table)")
    args = parser.parse_args()
    require_cuda()
    peak = peak_tflops(torch.device("cuda"), bf16=True, override=args.peak_tflops)
    attentions = ["flash", "sdpa"] if kernels.flash_attn_available() else ["sdpa"]
    tokens = args.micro_batch * args.seq_len
    columns = "| model | qk_norm | attention | prologue | step ms | tokens/s | MFU | vs torch prologue |"
    table = [columns, "|" + "---|" * (columns.count("|") - 1)]
    print(table[0], table[1], sep="\n", flush=True)
    for name in args.models:
        for qk_norm in args.qk_norm:
            cfg = preset(name, qk_norm)
            for attention in attentions:
                kernels.set_attention_backend(attention)
                times = {}
                for prologue in ("torch", "triton"):
                    kernels.set_backend(prologue)
                    times[prologue] = step_seconds(cfg, args.micro_batch, args.seq_len, args.warmup, args.steps)
                    # The last setting's model and optimizer states are garbage now: give their memory back.
                    gc.collect()
                    torch.cuda.empty_cache()
                    rate = tokens / times[prologue]
                    mfu = f"{100 * flops_per_token(cfg, args.seq_len) * rate / (peak * 1e12):.1f}%" if peak else "-"
                    speedup = f"{times['torch'] / times[prologue]:.3f}x"
                    cells = [name, qk_norm, attention, prologue, f"{1e3 * times[prologue]:.1f}", f"{rate:,.0f}", mfu]
                    row = "| " + " | ".join([*cells, speedup]) + " |"
                    table.append(row)
                    print(row, flush=True)
    header = [
        f"- bf16 weights and activations, torch AdamW (fused), micro-batch {args.micro_batch} x {args.seq_len} tokens,"
        " packed documents with document masking",
        f"- mean of {args.steps} steps after {args.warmup} warm-up steps; MFU against "
        + (f"{peak:.0f} TFLOP/s" if peak else "an unknown peak (pass --peak-tflops)"),
    ]
    print(f"wrote {write_results('train_step', header, table)}")


if __name__ == "__main__":
    main()
