"""Fused q/k prologue (Triton) against eager PyTorch, torch.compile and Liger-Kernel, on one CUDA GPU, in bf16.

    python benchmarks/bench_qk_norm_rope.py [--tokens 32768] [--seqs 2048 4096 8192 16384] [--peak-gbs 3350]

At the attention shapes of smollm_360m (15 q / 5 kv heads, head_dim 64), smollm3_3b (16/4, 128) and llama2_7b
(32/32, 128), for each sequence length (batch = tokens // seq), times forward, backward and both with
triton.testing.do_bench (median, L2 flushed between runs). Two variants: "norm+rope" (q and k RMS norm with gains,
then RoPE: the QK-norm / DroPE configurations) and "rope" (RoPE only: the presets as they are). RoPE tables are
per-batch fp32 (batch, seq, head_dim), as packed documents with restarting positions give them; q_scale is 1.0, the
training value. Achieved GB/s counts the minimum bytes the op must move (read q, k, tables and gains, write the
outputs; the backward also reads q and k again where a norm needs them), against the device's HBM peak.

Targets: forward >= 85% of peak, backward >= 75%, forward+backward >= 1.3x torch.compile of the reference.
Prints a markdown table and writes it, with device, date and commit, to
benchmarks/results/qk_norm_rope-<device>-<date>.md. Needs CUDA; exits with a message without it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

from nopetrain.kernels.reference import qk_norm_rope

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

# HBM peak GB/s from the vendors' data sheets; first substring match on the CUDA device name wins.
PEAK_GBS: list[tuple[str, float]] = [
    ("H100 PCIe", 2000.0),
    ("H100 NVL", 3900.0),
    ("H100", 3350.0),
    ("GH200", 4000.0),
    ("H200", 4800.0),
]
TARGETS = {"fwd": "fwd >= 85% peak", "bwd": "bwd >= 75% peak", "fwd+bwd": "fwd+bwd >= 1.3x compile"}


@dataclass(frozen=True)
class Shape:
    model: str
    heads: int
    kv_heads: int
    head_dim: int


SHAPES = [Shape("smollm_360m", 15, 5, 64), Shape("smollm3_3b", 16, 4, 128), Shape("llama2_7b", 32, 32, 128)]
EPS = 1e-6


def git_commit() -> str:
    """Short commit of the checkout, with -dirty when it has uncommitted changes: NOPETRAIN_COMMIT where set
    (gpu_check.sh reads it without git, which a bare GPU image may lack), else git's, else "unknown"."""
    if os.environ.get("NOPETRAIN_COMMIT"):
        return os.environ["NOPETRAIN_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        status = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True)
    except FileNotFoundError:
        return "unknown"
    return (head.stdout.strip() or "unknown") + ("-dirty" if status.stdout.strip() else "")


def write_results(name: str, header: list[str], table: list[str], device: str | None = None) -> Path:
    """benchmarks/results/<name>-<device>-<date>.md with the device (default: the CUDA device), date, commit and
    versions above the table."""
    device = device or torch.cuda.get_device_name()
    today = datetime.date.today().isoformat()
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    path = RESULTS / f"{name}-{slug}-{today}.md"
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = [
        f"- device: {device}",
        f"- date: {today}",
        f"- commit: {git_commit()}",
        f"- torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}",
    ]
    path.write_text("\n".join([f"# {name}", "", *meta, *header, "", *table, ""]))
    return path


def require_cuda() -> None:
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU (none found); the CPU tests check correctness only")


def peak_gbs(override: float | None) -> float | None:
    if override is not None:
        return override
    name = torch.cuda.get_device_name()
    return next((gbs for key, gbs in PEAK_GBS if key in name), None)


def liger_prologue() -> Callable | None:
    """Liger-Kernel's RMSNorm and RoPE composed into the same prologue, or None where liger_kernel is absent.
    Liger's RoPE wants (batch, heads, seq, head_dim): transposed views of our layout, which it turns back into
    contiguous (batch, seq, heads, head_dim) internally, so no copy is added. Both ops work in place."""
    try:
        from liger_kernel.transformers.functional import liger_rms_norm, liger_rope
    except ImportError:
        return None

    def prologue(q, k, q_norm_weight, k_norm_weight, cos, sin, q_scale, eps):
        if q_norm_weight is not None:
            q, k = liger_rms_norm(q, q_norm_weight, eps), liger_rms_norm(k, k_norm_weight, eps)
        if cos is not None:
            q, k = liger_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        return q, k

    return prologue


def min_bytes(shape: Shape, batch: int, seq: int, norm: bool) -> dict[str, int]:
    """The least traffic each pass must have: every input read once, every output written once."""
    tokens = batch * seq
    qk = tokens * (shape.heads + shape.kv_heads) * shape.head_dim * 2  # bf16
    tables = 2 * tokens * shape.head_dim * 4  # per-batch fp32 cos and sin
    gains = 2 * shape.head_dim * 2 if norm else 0
    forward = 2 * qk + tables + gains
    # Backward: read the output gradients, write dq/dk, read q/k again where the norm needs them, gains' gradients.
    backward = (3 if norm else 2) * qk + tables + 2 * gains
    return {"fwd": forward, "bwd": backward, "fwd+bwd": forward + backward}


def make_inputs(shape: Shape, batch: int, seq: int, norm: bool) -> dict:
    q = torch.randn(batch, seq, shape.heads, shape.head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, seq, shape.kv_heads, shape.head_dim, device="cuda", dtype=torch.bfloat16)
    gains = [torch.rand(shape.head_dim, device="cuda", dtype=torch.bfloat16) + 0.5 for _ in range(2)] if norm else []
    # Packed documents: positions restart every 1000 tokens at a different offset in each row.
    positions = (torch.arange(seq, device="cuda")[None] + 337 * torch.arange(batch, device="cuda")[:, None]) % 1000
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, shape.head_dim, 2, device="cuda") / shape.head_dim)
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return {
        "q": q,
        "k": k,
        "q_norm_weight": gains[0] if norm else None,
        "k_norm_weight": gains[1] if norm else None,
        "cos": angles.cos(),
        "sin": angles.sin(),
    }


def time_passes(fn: Callable, inputs: dict) -> dict[str, float]:
    """Median milliseconds of the forward, the backward alone (graph kept) and both, for prologue `fn`."""
    leaves = {n: t.detach().requires_grad_() for n, t in inputs.items() if t is not None and n not in ("cos", "sin")}
    args = {**inputs, **leaves}

    def forward():
        return fn(**args, q_scale=1.0, eps=EPS)

    with torch.no_grad():
        fwd = do_bench(forward, return_mode="median")
    outs = forward()
    grads = [torch.randn_like(out) for out in outs]
    bwd = do_bench(
        lambda: torch.autograd.grad(outs, list(leaves.values()), grads, retain_graph=True), return_mode="median"
    )
    both = do_bench(lambda: torch.autograd.grad(forward(), list(leaves.values()), grads), return_mode="median")
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": both}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32768, help="tokens per call; batch = tokens // seq")
    parser.add_argument("--seqs", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--models", nargs="+", default=[s.model for s in SHAPES], choices=[s.model for s in SHAPES])
    parser.add_argument("--variants", nargs="+", default=["norm+rope", "rope"], choices=["norm+rope", "rope"])
    parser.add_argument("--peak-gbs", type=float, default=None, help="HBM peak GB/s (default: from the device name)")
    args = parser.parse_args()
    require_cuda()
    from nopetrain.kernels.fused_qk_norm_rope import qk_norm_rope_fused

    peak = peak_gbs(args.peak_gbs)
    liger = liger_prologue()
    providers: dict[str, Callable | None] = {"eager": qk_norm_rope, "compile": None, "liger": liger}
    columns = "| model | variant | batch x seq | pass | fused ms | GB/s | % peak | eager ms | compile ms | liger ms |"
    columns += " vs eager | vs compile | vs liger | target |"
    table = [columns, "|" + "---|" * (columns.count("|") - 1)]
    print(table[0], table[1], sep="\n", flush=True)
    for shape in (s for s in SHAPES if s.model in args.models):
        for variant in args.variants:
            norm = variant == "norm+rope"
            for seq in args.seqs:
                batch = max(1, args.tokens // seq)
                inputs = make_inputs(shape, batch, seq, norm)
                # A fresh compile per shape: specialised kernels, no recompile limit, no dynamic-shape fallback.
                torch._dynamo.reset()
                providers["compile"] = torch.compile(qk_norm_rope, dynamic=False)
                fused = time_passes(qk_norm_rope_fused, inputs)
                others = {name: time_passes(fn, inputs) if fn else None for name, fn in providers.items()}
                traffic = min_bytes(shape, batch, seq, norm)
                for name, ms in fused.items():
                    gbs = traffic[name] / ms / 1e6
                    pct = 100 * gbs / peak if peak else None
                    times = {p: (t[name] if t else None) for p, t in others.items()}
                    ratios = [f"{t / ms:.2f}x" if t else "-" for t in times.values()]
                    met = {
                        "fwd": pct is not None and pct >= 85,
                        "bwd": pct is not None and pct >= 75,
                        "fwd+bwd": times["compile"] / ms >= 1.3,
                    }[name]
                    cells = [shape.model, variant, f"{batch} x {seq}", name, f"{ms:.3f}", f"{gbs:,.0f}"]
                    cells += [f"{pct:.0f}%" if pct is not None else "-"]
                    cells += [f"{t:.3f}" if t else "-" for t in times.values()]
                    cells += [*ratios, ("met: " if met else "missed: ") + TARGETS[name]]
                    row = "| " + " | ".join(cells) + " |"
                    table.append(row)
                    print(row, flush=True)
                del inputs
                torch.cuda.empty_cache()
    header = [
        f"- HBM peak used for % peak: {f'{peak:,.0f} GB/s' if peak else 'unknown (pass --peak-gbs)'}",
        f"- tokens per call {args.tokens}, bf16 q/k/gains, per-batch fp32 RoPE tables, q_scale 1.0",
        f"- Liger-Kernel: {'RMSNorm + RoPE' if liger else 'not installed'}",
        "- GB/s = minimum bytes moved / median time (triton.testing.do_bench); ratios = other's time / fused time",
    ]
    print(f"wrote {write_results('qk_norm_rope', header, table)}")


if __name__ == "__main__":
    main()
