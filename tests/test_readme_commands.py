"""The README's training commands run as written: each `python train.py ...` / `torchrun ... train.py ...` line of
its code blocks, with only a short step count, a temporary run directory and synthetic data appended (later
overrides win in Hydra), so a config the README shows but `validate()` refuses fails here. Its cluster commands
(srun + torchrun, launch/torchrun.sh on a node, the SLURM generator, a planned dry run) are planned at their world
size, and each must fit the GPU it plans for."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import REPO, subprocess_env

# Commands that need what a test machine has not: a cluster, a user's corpus, a downloaded model.
NEEDS_A_CLUSTER_OR_USER_DATA = ("srun ", "data=mine", "init_from=hf:")


def readme_commands() -> list[str]:
    """Every command of the README's bash blocks, continuation lines joined, comments dropped."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL):
        for command in block.replace("\\\n", " ").splitlines():
            command = command.split("  #")[0].strip()
            if command:
                commands.append(command)
    return commands


def readme_training_commands() -> list[str]:
    return [
        command
        for command in readme_commands()
        if re.match(r"(python|torchrun) .*train\.py", command)
        and not any(marker in command for marker in NEEDS_A_CLUSTER_OR_USER_DATA)
    ]


def option(args: list[str], name: str, default: int | None = None) -> int:
    """The integer value of `--name N` or `--name=N` in args."""
    for index, arg in enumerate(args):
        if arg == name:
            return int(args[index + 1])
        if arg.startswith(f"{name}="):
            return int(arg.split("=", 1)[1])
    if default is None:
        raise AssertionError(f"{name} missing from {' '.join(args)}")
    return default


# A node of the plan's default cluster (plan.gpus_per_node): what launch/torchrun.sh starts on one.
GPUS_PER_NODE = 8


def cluster_plans() -> list[tuple[str, int, list[str]]]:
    """(command, world size, train.py overrides) of every multi-GPU command of the README."""
    plans = []
    for command in readme_commands():
        args = shlex.split(command)
        if "launch/torchrun.sh" in args:
            plans.append((command, GPUS_PER_NODE, args[args.index("launch/torchrun.sh") + 1 :]))
        elif "srun" in args and "torchrun" in args:
            world = option(args, "--nnodes") * option(args, "--nproc_per_node")
            plans.append((command, world, args[args.index("train.py") + 1 :]))
        elif "nopetrain.launch.slurm" in args:
            world = option(args, "--nodes") * option(args, "--gpus-per-node")
            plans.append((command, world, args[args.index("--") + 1 :]))
        elif "train.py" in args and "dry_run=true" in args and not args[args.index("train.py") - 1].endswith("-m"):
            world = next(int(a.split("=")[1]) for a in args if a.startswith("plan.world_size="))
            plans.append((command, world, args[args.index("train.py") + 1 :]))
    return plans


CLUSTER_PLANS = cluster_plans()


def test_the_readme_shows_cluster_commands():
    assert len(CLUSTER_PLANS) >= 4, CLUSTER_PLANS


@pytest.mark.parametrize(("command", "world_size", "overrides"), CLUSTER_PLANS, ids=lambda value: str(value)[:40])
def test_cluster_commands_fit_the_gpus_they_plan_for(tmp_path: Path, command, world_size, overrides):
    """Planned as written at its world size; a user's own data config (data=mine) is the shipped one, which a dry run
    does not read."""
    overrides = ["data=default" if o == "data=mine" else o for o in overrides if o != "dry_run=true"]
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *overrides, f"plan.world_size={world_size}", "dry_run=true"],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
    [verdict] = [line for line in proc.stdout.splitlines() if line.startswith("memory verdict:")]
    assert verdict.startswith("memory verdict: fits in "), f"{command}\n{verdict}"


COMMANDS = readme_training_commands()


def test_the_readme_shows_training_commands():
    assert len(COMMANDS) >= 3, COMMANDS


@pytest.mark.slow
def test_readme_training_commands_run_as_written(tmp_path: Path):
    """In README order, so that the command that resumes `my-run` finds the run the first one made."""
    for command in COMMANDS:
        args = shlex.split(command)
        name = next((a.split("=", 1)[1] for a in args if a.startswith("run.name=")), "default")
        extra = [f"run.dir={tmp_path / name}", "steps=2", "log_every=1", "data=synthetic", "wandb.mode=offline"]
        # The README's environment is the activated .venv: this interpreter, and torchrun as its module.
        args[:1] = [sys.executable] if args[0] == "python" else [sys.executable, "-m", "torch.distributed.run"]
        proc = subprocess.run(
            [*args, *extra], cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
