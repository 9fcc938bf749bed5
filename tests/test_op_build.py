"""DeepSpeed's JIT op builds (FusedAdam on GPU, CPU Adam with optimizer offload) under nopetrain.parallel.build_op:
a build killed part-way no longer blocks every later start, and a start that waits for another build says for whom.
torch's own build is the `load` step, which takes minutes; here `load` writes the library file as the build would,
and the locks, the stale file and the waiting are real, between real processes."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nopetrain.parallel import build_op, optimizer_ops
from tests.helpers import REPO, composed, losses, subprocess_env, train_command

NAME = "fused_adam"


def fake_build(build_dir: Path, calls: list[float]):
    def load() -> None:
        calls.append(time.monotonic())
        build_dir.mkdir(parents=True, exist_ok=True)
        (build_dir / f"{NAME}.so").write_bytes(b"")

    return load


def test_a_killed_builds_lock_file_is_removed_with_a_warning(tmp_path, caplog):
    build_dir = tmp_path / NAME
    build_dir.mkdir()
    (build_dir / "lock").touch()  # what torch's FileBaton leaves when its build is SIGKILLed
    calls: list[float] = []
    with caplog.at_level(logging.INFO, logger="nopetrain"):
        build_op(NAME, build_dir, fake_build(build_dir, calls))
    assert len(calls) == 1 and not (build_dir / "lock").exists()
    assert f"removed {build_dir / 'lock'}, left by a build of DeepSpeed's {NAME} op that was killed" in caplog.text
    assert f"building DeepSpeed's {NAME} op in {build_dir}" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="nopetrain"):
        build_op(NAME, build_dir, fake_build(build_dir, calls))
    assert len(calls) == 2 and "building" not in caplog.text  # built already: loaded without a word


HOLD = """
import sys, time
from pathlib import Path
from nopetrain.ownership import HolderLock
lock = HolderLock(Path(sys.argv[1]))
assert lock.try_acquire() is None
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def holder(owner: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(owner), str(seconds)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline() == "held\n"
    return proc


def test_a_start_waits_for_a_live_build_and_names_it(tmp_path, caplog):
    build_dir = tmp_path / NAME
    proc = holder(tmp_path / f"{NAME}.owner", seconds=2)
    calls: list[float] = []
    with caplog.at_level(logging.INFO, logger="nopetrain"):
        build_op(NAME, build_dir, fake_build(build_dir, calls))
    ended = time.monotonic()
    proc.wait(timeout=10)
    assert f"waiting for pid {proc.pid} on host" in caplog.text and f"building DeepSpeed's {NAME} op" in caplog.text
    assert len(calls) == 1 and calls[0] <= ended


def test_a_killed_builder_does_not_hold_the_next_start(tmp_path, caplog):
    build_dir = tmp_path / NAME
    proc = holder(tmp_path / f"{NAME}.owner", seconds=600)
    proc.kill()
    proc.wait(timeout=10)
    start = time.monotonic()
    with caplog.at_level(logging.INFO, logger="nopetrain"):
        build_op(NAME, build_dir, fake_build(build_dir, []))
    assert time.monotonic() - start < 5 and "waiting" not in caplog.text


@pytest.mark.parametrize(
    ("overrides", "cpu", "ops"),
    [
        ([], True, []),  # torch's fused AdamW: nothing to build
        ([], False, ["FusedAdamBuilder"]),
        (["deepspeed.offload_optimizer=true"], True, ["CPUAdamBuilder"]),
        (["deepspeed.offload_optimizer=true"], False, ["CPUAdamBuilder"]),
    ],
)
def test_the_ops_each_optimizer_set_up_loads(overrides, cpu, ops):
    assert optimizer_ops(composed(*overrides), cpu) == ops


def test_a_run_trains_without_importing_deepspeeds_muon_kernels(tmp_path: Path) -> None:
    """ZeRO imports its Muon kernels in every gradient reduction, and importing them compiles (torch._dynamo and
    inductor: about 2 s of every start). A run with AdamW takes its steps without them."""
    cmd = train_command(tmp_path / "run", "steps=2")
    proc = subprocess.run(
        [cmd[0], "-X", "importtime", *cmd[1:]], cwd=REPO, env=subprocess_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "deepspeed.runtime.zero.stage_1_and_2" in imported
    assert not {"deepspeed.runtime.zero.muon.original_muon", "torch._inductor.compile_fx"} & imported
    assert len(losses(tmp_path / "run")) == 2


@pytest.mark.parametrize("optimizer, stand_in", [("AdamW", True), ("Muon", False)])
def test_the_muon_stand_in_is_left_out_when_deepspeed_extra_asks_for_muon(optimizer, stand_in):
    code = (
        "import sys; from nopetrain.parallel import MUON_KERNELS, skip_muon_import; "
        f"skip_muon_import({{'optimizer': {{'type': {optimizer!r}}}}}); print(MUON_KERNELS in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1] == str(stand_in)
