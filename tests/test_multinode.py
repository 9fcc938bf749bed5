"""Two "nodes" on one machine: two torchrun agents (launch/torchrun.sh, --nnodes=2, c10d rendezvous on 127.0.0.1)
train ZeRO-2 steps that match one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nopetrain.parallel import free_port

from .helpers import REPO, losses, run_train, subprocess_env, train_command

pytestmark = pytest.mark.slow

# Global batch 8 = 1 process x 2 accumulation x 4, or 2 nodes x 1 process x 1 x 4.
BATCH = ("global_batch_size=8", "micro_batch_size=4", "seq_len=64", "deepspeed=zero2", "steps=3")


def test_two_torchrun_agents_match_one_process(tmp_path):
    single = tmp_path / "single"
    run_train(single, *BATCH)

    run_dir = tmp_path / "two_nodes"
    overrides = train_command(run_dir, *BATCH)[2:]  # train.py's overrides, without the interpreter and script
    env = subprocess_env()
    env.update(NNODES="2", NPROC="1", RDZV_ENDPOINT=f"127.0.0.1:{free_port()}")
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env["PATH"]])  # torchrun of this venv
    agents = [
        subprocess.Popen(
            ["bash", str(REPO / "launch" / "torchrun.sh"), *overrides],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [agent.communicate(timeout=600)[0] for agent in agents]
    for agent, output in zip(agents, outputs, strict=True):
        assert agent.returncode == 0, output[-3000:]
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == ["rank_00000.log", "rank_00001.log"]
    two = losses(run_dir)
    assert sorted(two) == [1, 2, 3]
    for step, loss in losses(single).items():
        assert two[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), f"step {step}"
