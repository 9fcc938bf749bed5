"""The commands pyproject.toml installs beside train.py: each is on the venv's path and answers --help under its own
name."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from .helpers import REPO, subprocess_env

SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def test_the_commands_a_user_expects_are_declared():
    expected = {"nopetrain-data", "nopetrain-eval", "nopetrain-experiment", "nopetrain-export", "nopetrain-slurm"}
    assert expected <= set(SCRIPTS), sorted(SCRIPTS)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_each_command_is_installed_and_its_help_names_it(name: str):
    command = Path(sys.executable).parent / name
    assert command.is_file(), f"{command}: not installed; reinstall the project (make install)"
    proc = subprocess.run(
        [command, "--help"], cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert name in proc.stdout, proc.stdout[:2000]
