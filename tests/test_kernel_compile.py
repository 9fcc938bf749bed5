"""The fused q/k kernels compile ahead of time for real GPUs (sm_80, sm_90) as their launcher launches them, for
every model preset's heads and head_dim in bf16 and fp32 (nopetrain/kernels/compile_report.py): no spills, no stack
frame (no local memory), registers and shared memory within the bounds the launch was sized for (see
qk_norm_rope_triton.BACKWARD_WARPS_PER_SM). The compiles run in a process of their own without TRITON_INTERPRET, which
other kernel tests set (an interpreted kernel cannot be compiled). Runs under the Triton the environment has: the
lock's in the suite, the GPU image's 3.6.0 in `make test-device-versions` (part of `make test`). Nothing here imports
the kernels' module: in the suite's process it must be built in interpreter mode, as the kernel tests build it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .helpers import REPO

# 16 resident warps per SM need at most 65,536 / (16 x 32) registers per thread.
MAX_REGISTERS = 128
# The kernels use shared memory only for reductions across a tile's warps: a few KiB.
MAX_SHARED_BYTES = 8 * 1024


@pytest.fixture(scope="module")
def reports() -> dict[tuple[str, str, str, int], dict]:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "nopetrain.kernels.compile_report", "--arch", "80", "90", "--json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stderr.strip().splitlines()[-1])
    rows = json.loads(proc.stdout)
    return {(row["shape"], row["kernel"], row["dtype"], row["arch"]): row for row in rows}


def test_every_kernel_compiles_for_real_gpus_without_spills(reports):
    presets = {shape for shape, *_ in reports}
    assert {"tiny", "smollm_135m", "smollm3_3b", "llama2_7b"} <= presets
    assert len(reports) == len(presets) * 2 * 2 * 2
    for key, report in reports.items():
        print(key, report)
        assert report["spill_stores"] == report["spill_loads"] == report["stack"] == 0, (key, report)
        assert report["registers"] <= MAX_REGISTERS, (key, report)
        assert report["shared"] <= MAX_SHARED_BYTES, (key, report)


def test_the_backward_launch_fills_each_sm_with_the_warps_its_registers_allow(reports):
    """16 warps per SM: 1 warp per program for tiny's 4 x 32 heads (16 programs per SM), 8 for smollm3_3b's 16 x 128
    (2), 16 for llama2_7b's 32 x 128 (1); the warps follow the tile, 4 elements of a head-dim half per thread."""
    rows = [row for (_, kernel, _, _), row in reports.items() if kernel == "backward"]
    warps = {row["shape"]: row["num_warps"] for row in rows}
    assert warps["tiny"] == 1 and warps["smollm3_3b"] == 8 and warps["llama2_7b"] == 16
    per_sm = rows[0]["backward_warps_per_sm"]
    assert per_sm == 16 and all(num_warps * max(per_sm // num_warps, 1) == per_sm for num_warps in warps.values())
