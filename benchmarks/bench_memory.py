"""Peak memory and step time of a real DeepSpeed training step for each activation checkpointing mode and the
chunked loss, against the dry run's plan, side by side in one run (on CPU by default, the only machine CI has).

    python benchmarks/bench_memory.py [--model smollm_135m] [--seq-len 2048] [--micro-batch 2]
        [--precisions fp32 bf16] [--steps 2] [--chunk-tokens 1024]

For each precision and setting: a DeepSpeed ZeRO-2 engine built as the trainer builds it (a gloo group of one, the
model from configs/model/<name>.yaml, the PyTorch q/k prologue, AdamW), random tokens; one warm-up step, `--steps`
timed steps, then one more step under torch's profiler, whose peak allocation (nopetrain.profiling.allocated_bytes:
the CPU's counterpart of CUDA's max_memory_allocated) is compared with the plan's bounds, from weights + optimizer
states + activations up to everything at once. DeepSpeed's reduce bucket is made small (1M elements) so that the
model's own memory dominates, as in tests/test_dry_run.py. Step times are ratios to `none` of the same precision:
this machine's absolute times say nothing of a GPU's. Results: benchmarks/results/memory-<device>-<date>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_qk_norm_rope import write_results  # sibling script: shared results header
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

from nopetrain.config import TrainConfig, register_configs
from nopetrain.parallel import build_engine, destroy_process_group, init_distributed
from nopetrain.plan import make_plan
from nopetrain.profiling import allocated_bytes

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {
    "none": (),
    "selective (ops)": ("activation_checkpointing.mode=selective",),
    "selective (every 2nd block)": (
        "activation_checkpointing.mode=selective",
        "activation_checkpointing.every=2",
        "activation_checkpointing.policy=block",
    ),
    "full": ("activation_checkpointing.mode=full",),
    "chunked loss": ("loss.chunk_tokens={chunk}",),
    "full + chunked loss": ("activation_checkpointing.mode=full", "loss.chunk_tokens={chunk}"),
}
MIB = 2**20


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def config(args: argparse.Namespace, precision: str, setting: tuple[str, ...]) -> TrainConfig:
    overrides = [
        f"model={args.model}",
        "deepspeed=zero2",
        f"precision={precision}",
        "kernels=torch",
        "data=synthetic",
        f"seq_len={args.seq_len}",
        f"micro_batch_size={args.micro_batch}",
        f"global_batch_size={args.micro_batch}",
        "plan.world_size=1",
        "+deepspeed.extra.zero_optimization.reduce_bucket_size=1000000",
        *(override.format(chunk=args.chunk_tokens) for override in setting),
    ]
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return OmegaConf.to_object(compose("train", overrides=overrides))


def train_step(engine, tokens: torch.Tensor) -> None:
    engine.backward(engine(tokens[:, :-1], labels=tokens[:, 1:]))
    engine.step()


def peak_bytes(cfg: TrainConfig, env, tokens: torch.Tensor) -> int:
    """The most bytes torch allocates in a real engine's second step (AdamW's moments exist from the first), counted
    from before the engine is built."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        engine = build_engine(cfg, env)
        train_step(engine, tokens)
        with record_function("measured step"):
            train_step(engine, tokens)
    return allocated_bytes(prof, "measured step")[0]


def step_seconds(cfg: TrainConfig, env, tokens: torch.Tensor, steps: int) -> float:
    """Median wall time of `steps` steps of a fresh engine, unprofiled, after one warm-up step."""
    engine = build_engine(cfg, env)
    train_step(engine, tokens)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        train_step(engine, tokens)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_one(args: argparse.Namespace) -> None:
    """One precision and setting in this process (`--one`): prints its plan, peak and step time as JSON."""
    env = init_distributed()  # a gloo group of one, as `python train.py` makes
    try:
        precision, name = args.one
        cfg = config(args, precision, SETTINGS[name])
        memory = make_plan(cfg).memory
        tokens = torch.randint(cfg.model.vocab_size, (cfg.micro_batch_size, cfg.seq_len + 1))
        peak = peak_bytes(cfg, env, tokens)
        seconds = step_seconds(cfg, env, tokens, args.steps)
    finally:
        destroy_process_group(env)
    plan = {"floor": memory.floor, "total": memory.total, "activations": memory.activations.peak}
    print(json.dumps({"peak": peak, "seconds": seconds, **plan}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm_135m")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--chunk-tokens", type=int, default=1024)
    parser.add_argument("--one", nargs=2, metavar=("PRECISION", "SETTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if torch.cuda.is_available():
        sys.exit("this benchmark measures on CPU (the profiler's allocations); on a GPU use tests/test_dry_run.py")
    if args.one:
        measure_one(args)
        return
    rows = [
        "| precision | setting | peak (MiB) | plan floor - total (MiB) | peak within plan | step time / none | "
        "activations planned (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    shape = ["--model", args.model, "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch)]
    shape += ["--steps", str(args.steps), "--chunk-tokens", str(args.chunk_tokens)]
    for precision in args.precisions:
        baseline = None
        for name in SETTINGS:
            # Each setting in a process of its own: two engines of a 135M model hold GiBs that DeepSpeed's references
            # keep alive after the engine goes out of scope, and one setting's allocations must not meet another's.
            proc = subprocess.run(
                [sys.executable, __file__, *shape, "--one", precision, name], capture_output=True, text=True, check=True
            )
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            baseline = baseline or result["seconds"]
            within = 0.98 * result["floor"] <= result["peak"] <= 1.02 * result["total"]
            row = (
                f"| {precision} | {name} | {result['peak'] / MIB:,.0f} | {result['floor'] / MIB:,.0f} - "
                f"{result['total'] / MIB:,.0f} | {'yes' if within else 'NO'} | {result['seconds'] / baseline:.2f} | "
                f"{result['activations'] / MIB:,.0f} |"
            )
            print(row, f"({result['seconds']:.2f} s/step)", flush=True)
            rows.append(row)
    header = [
        f"- model {args.model}, micro-batch {args.micro_batch} x {args.seq_len} tokens, ZeRO-2 over gloo (one "
        f"process), DeepSpeed reduce bucket 1M elements, PyTorch q/k prologue, loss chunks of {args.chunk_tokens}",
        "- peak: torch's allocations in the second step of a profiled engine; step time: another engine's median of "
        f"{args.steps} unprofiled steps after one warm-up, as a ratio to `none` of the same precision; each setting "
        "in a process of its own",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads",
    ]
    print(write_results("memory", header, rows, device="cpu"))


if __name__ == "__main__":
    main()
