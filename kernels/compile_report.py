"""The fused q/k kernels compiled ahead of time for real GPUs, without one: Triton's compiler to PTX for a CUDA
target (sm_80: A100, sm_90: H100/H200, ...), then ptxas, which ships with Triton, with -v for registers, spills and
stack. Each kernel is compiled as its launcher would launch it for a model shape: the same arguments (the launcher's
own `forward_launch` / `backward_launch` on CPU tensors of that shape), specialised as Triton's runtime specialises
them (its `native_specialize_impl`: 32-bit integers, 16-byte divisibility, 1 and None as constants), and the
launcher's tiles and warps.

    python -m nopetrain.kernels.compile_report [--arch 80 90] [--json]

prints, for every preset of configs/model/ (or --shape HEADS KV_HEADS HEAD_DIM), what each kernel uses. It must run
without TRITON_INTERPRET: interpreted kernels cannot be compiled (tests/test_kernel_compile.py runs it in a process of
its own for that reason)."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import ASTSource
from triton.runtime.jit import native_specialize_impl

from nopetrain.kernels import qk_norm_rope_triton as kernels

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"


def preset_shapes(folder: Path = CONFIGS) -> dict[str, tuple[int, int, int]]:
    """(heads, kv heads, head_dim) of every model preset in `folder` (configs/model/)."""
    from omegaconf import OmegaConf

    shapes = {}
    for path in sorted(folder.glob("*.yaml")):
        model = OmegaConf.load(path)
        head_dim = model.get("head_dim") or model.hidden_size // model.num_heads
        shapes[path.stem] = (model.num_heads, model.num_kv_heads, head_dim)
    return shapes


def ptxas_report(kernel: str, shape: tuple[int, int, int], dtype: torch.dtype, arch: int) -> dict[str, int]:
    """Compile `kernel` ("forward" or "backward") as launched for heads, kv heads, head_dim `shape` in `dtype` for
    sm_`arch`, with QK-norm on q and k and RoPE from per-row tables (packed documents): the variant that keeps the
    most values live. Returns registers, stack and spill bytes (ptxas), shared memory and warps (Triton)."""
    heads, kv_heads, head_dim = shape
    batch, seq = 2, 64
    q = torch.zeros(batch, seq, heads, head_dim, dtype=dtype)
    k = torch.zeros(batch, seq, kv_heads, head_dim, dtype=dtype)
    gain = torch.ones(head_dim, dtype=dtype)
    table = torch.zeros(batch, seq, head_dim)
    if kernel == "forward":
        fn = kernels.qk_norm_rope_fwd_kernel
        _, args, meta = kernels.forward_launch(q, k, q, k, gain, gain, table, table, 1.0, 1e-6)
    else:
        fn = kernels.qk_norm_rope_bwd_kernel
        partial = torch.zeros(4, head_dim)
        _, args, meta = kernels.backward_launch(
            q, k, q, k, q, k, gain, gain, partial, partial, table, table, 1.0, 1e-6, programs=4
        )
    backend = CUDABackend(GPUTarget("cuda", arch, 32))
    params = dict(zip(fn.arg_names, args + tuple(meta[name] for name in fn.arg_names[len(args) :]), strict=True))
    signature, constants, attrs = {}, {}, {}
    for index, (name, value) in enumerate(params.items()):
        if name in meta:
            signature[name], constants[(index,)] = "constexpr", meta[name]
            continue
        kind, specialisation = native_specialize_impl(backend, value, False, True, True)
        signature[name] = kind
        if kind == "constexpr":
            constants[(index,)] = specialisation
        elif isinstance(specialisation, str) and specialisation:
            attrs[(index,)] = backend.parse_attr(specialisation)
    source = ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
    compiled = triton.compile(source, target=backend.target, options={"num_warps": meta["num_warps"]})
    ptx = compiled.asm["ptx"]
    ptx_arch = re.search(r"^\.target (\w+)", ptx, re.MULTILINE)[1]
    out = subprocess.run(
        [str(PTXAS), f"-arch={ptx_arch}", "-v", "-", "-o", "/dev/null"],
        input=ptx,
        capture_output=True,
        text=True,
        check=True,
    )
    report = out.stdout + out.stderr
    return {
        "registers": int(re.search(r"Used (\d+) registers", report)[1]),
        "stack": int(re.search(r"(\d+) bytes stack frame", report)[1]),
        "spill_stores": int(re.search(r"(\d+) bytes spill stores", report)[1]),
        "spill_loads": int(re.search(r"(\d+) bytes spill loads", report)[1]),
        "shared": compiled.metadata.shared,
        "num_warps": meta["num_warps"],
        "backward_warps_per_sm": kernels.BACKWARD_WARPS_PER_SM,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="CUDA compute capabilities x 10")
    parser.add_argument("--shape", type=int, nargs=3, metavar=("HEADS", "KV_HEADS", "HEAD_DIM"))
    parser.add_argument("--json", action="store_true", help="one JSON list of rows instead of a table")
    args = parser.parse_args()
    shapes = {"shape": tuple(args.shape)} if args.shape else preset_shapes()
    rows = []
    for name, shape in shapes.items():
        for kernel in ("forward", "backward"):
            for dtype in (torch.bfloat16, torch.float32):
                for arch in args.arch:
                    report = ptxas_report(kernel, shape, dtype, arch)
                    rows.append({"shape": name, "kernel": kernel, "dtype": str(dtype)[6:], "arch": arch, **report})
                    if not args.json:
                        print(" ".join(f"{key}={value}" for key, value in rows[-1].items()), flush=True)
    if args.json:
        print(json.dumps(rows))
    print(f"triton {triton.__version__}", file=sys.stderr)


if __name__ == "__main__":
    main()
