"""The README's training commands run as written: each `python train.py ...` / `torchrun ... train.py ...` line of
its code blocks, with only a short step count, a temporary run directory and synthetic data appended (later
overrides win in Hydra), so a config the README shows but `validate()` refuses fails here."""

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


def readme_training_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL):
        for command in block.replace("\\\n", " ").splitlines():
            command = command.split("  #")[0].strip()
            if re.match(r"(python|torchrun) .*train\.py", command) and not any(
                marker in command for marker in NEEDS_A_CLUSTER_OR_USER_DATA
            ):
                commands.append(command)
    return commands


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
