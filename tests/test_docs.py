"""The README and docs/ say what the code does: every command of their bash blocks has a test (a command no rule
covers fails here), the configuration reference is what the schema gives, every link and anchor resolves.

How each command is tested (`RULES`, first match wins): local training commands run as written, with a short step
count, a temporary run directory and the small corpus appended (later overrides win in Hydra); cluster commands (srun
+ torchrun, launch/torchrun.sh, the SLURM generator, a planned dry run) are planned at their world size and must fit
the GPU they plan for; the generator writes its job file (without --submit); `make train`'s recipe runs at a tiny
size. What cannot run here (a user's corpus, a trained 1.7B run, a GPU, W&B's servers, a Docker engine, hours of
training) is skipped with its reason, most naming the test that runs the same command on a small scale."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import REPO, corpus_overrides, subprocess_env

DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
README_MAX_LINES = 150

RUN, PLAN, GENERATE, MAKE_TRAIN, SKIP = "run", "plan", "generate", "make train", "skip"
# (pattern, how it is tested, why a skipped one is): the first pattern that matches a command decides.
RULES: list[tuple[str, str, str]] = [
    (r"^make train$", MAKE_TRAIN, ""),
    (r"^make test$", SKIP, "the command that runs this suite"),
    (r"^make (lock|test-latest)\b", SKIP, "re-resolves every package from the registry (minutes of downloads)"),
    (r"^source \.venv/bin/activate$", SKIP, "shell set-up: the tests run this interpreter, the venv's"),
    (r"^wandb (login|sync)\b", SKIP, "talks to W&B's servers; runs log offline here"),
    (r"^docker ", SKIP, "no Docker engine here; tests/test_dockerfile.py checks the Dockerfile against the lock"),
    (r"^nopetrain-slurm ", GENERATE, ""),
    (r"\bsrun .*\btorchrun\b.*\btrain\.py\b|\blaunch/torchrun\.sh\b|\btrain\.py\b.*\bdry_run=true\b", PLAN, ""),
    (r"^(python|torchrun) .*\btrain\.py\b.*\binit_from=hf:", SKIP, "a downloaded model; tests/test_hf.py loads one"),
    (r"^(python|torchrun) .*\btrain\.py\b", RUN, ""),
    (r"^nopetrain-data ", SKIP, "a user's corpus; tests/test_data_pipelines.py runs these commands on real files"),
    (r"^nopetrain-eval ", SKIP, "trained runs; tests/eval/test_cli.py evaluates tiny ones end to end"),
    (r"^nopetrain-export ", SKIP, "a trained run; tests/test_export.py exports tiny ones, a run directory included"),
    (r"^nopetrain-experiment ", SKIP, "hours of training; tests/test_experiment.py runs a two-arm experiment"),
]
# A node of the plan's default cluster (plan.gpus_per_node): what launch/torchrun.sh starts on one.
GPUS_PER_NODE = 8


def doc_commands() -> list[tuple[str, str]]:
    """(file, command) for every command of every bash block, continuation lines joined, comments dropped."""
    found = []
    for path in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.DOTALL):
            for command in block.replace("\\\n", " ").splitlines():
                command = " ".join(command.split("  #")[0].split())
                if command and not command.startswith("#"):
                    found.append((str(path.relative_to(REPO)), command))
    return found


def rule(command: str) -> tuple[str, str] | None:
    return next(((kind, reason) for pattern, kind, reason in RULES if re.search(pattern, command)), None)


COMMANDS = doc_commands()


def commands_of(kind: str) -> list[str]:
    return [command for _, command in COMMANDS if (rule(command) or ("",))[0] == kind]


def test_every_command_of_the_docs_has_a_test():
    uncovered = [f"{path}: {command}" for path, command in COMMANDS if rule(command) is None]
    assert not uncovered, "commands no rule of tests/test_docs.py tests:\n" + "\n".join(uncovered)
    kinds = {rule(command)[0] for _, command in COMMANDS}
    assert {RUN, PLAN, GENERATE, MAKE_TRAIN} <= kinds, kinds


def test_the_readme_is_a_front_door():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, len(lines)
    # The two commands come first, before any other section.
    first_block = (REPO / "README.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0]
    assert [line.split("#")[0].strip() for line in first_block.splitlines()] == ["make train", "make test"]


def test_the_configuration_reference_is_what_the_schema_gives():
    proc = subprocess.run(
        [sys.executable, "tools/config_reference.py", "--check"], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


def anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a markdown file: lower case, punctuation dropped, spaces to hyphens."""
    found = set()
    for heading in re.findall(r"^#+ (.+)$", path.read_text(), re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug)
    return found


def test_every_link_and_anchor_resolves():
    broken = []
    for path in [*DOCS, REPO / "ARCHITECTURE.md"]:
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            if not linked.exists():
                broken.append(f"{path.relative_to(REPO)}: {target} (no {file})")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{path.relative_to(REPO)}: {target} (no heading #{anchor})")
    assert not broken, "\n".join(broken)


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


def planned(command: str) -> tuple[int, list[str]]:
    """(world size, train.py overrides) of a cluster command."""
    args = shlex.split(command)
    if "launch/torchrun.sh" in args:
        return GPUS_PER_NODE, args[args.index("launch/torchrun.sh") + 1 :]
    if "srun" in args and "torchrun" in args:
        return option(args, "--nnodes") * option(args, "--nproc_per_node"), args[args.index("train.py") + 1 :]
    if args[0] == "nopetrain-slurm":
        return option(args, "--nodes") * option(args, "--gpus-per-node", 8), args[args.index("--") + 1 :]
    world = next(int(a.split("=")[1]) for a in args if a.startswith("plan.world_size="))
    return world, args[args.index("train.py") + 1 :]


PLANNED = sorted(set(commands_of(PLAN) + commands_of(GENERATE)))


@pytest.mark.parametrize("command", PLANNED, ids=lambda command: command[:50])
def test_cluster_commands_fit_the_gpus_they_plan_for(tmp_path: Path, command: str):
    """Planned as written at its world size; a user's own data config (data=mine) is the shipped one, which a dry run
    does not read."""
    world_size, overrides = planned(command)
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


@pytest.mark.parametrize("command", commands_of(GENERATE), ids=lambda command: command[:50])
def test_generator_commands_write_their_job(tmp_path: Path, command: str):
    args = [arg for arg in shlex.split(command) if arg != "--submit"]
    job_file = tmp_path / "job.sbatch"
    generator = Path(sys.executable).parent / args[0]
    dash = args.index("--")
    args = [str(generator), *args[1:dash], "--output", str(job_file), *args[dash:]]
    proc = subprocess.run(args, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{command}\n{proc.stderr}"
    job = job_file.read_text()
    for override in shlex.split(command)[shlex.split(command).index("--") + 1 :]:
        assert override in job, (override, job)


def as_run_here(args: list[str]) -> list[str]:
    """The docs' environment is the activated .venv: this interpreter, and torchrun as its module."""
    return (
        [sys.executable, *args[1:]]
        if args[0] == "python"
        else [sys.executable, "-m", "torch.distributed.run", *args[1:]]
    )


@pytest.mark.slow
def test_training_commands_run_as_written(tmp_path: Path, corpus: Path):
    """In the docs' order, so that a command that resumes `my-run` finds the run the first one made."""
    commands = commands_of(RUN)
    assert len(commands) >= 3, commands
    for command in commands:
        args = shlex.split(command)
        name = next((a.split("=", 1)[1] for a in args if a.startswith("run.name=")), "default")
        extra = [f"run.dir={tmp_path / name}", "steps=2", "log_every=1", *corpus_overrides(corpus)]
        extra.append("wandb.mode=offline")
        proc = subprocess.run(
            [*as_run_here(args), *extra], cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"


@pytest.mark.slow
def test_make_train_runs_its_recipe(tmp_path: Path, corpus: Path):
    """The Makefile's train recipe as make would run it (set-up and corpus taken as done), at a tiny size."""
    dry = subprocess.run(
        ["make", "-s", "-n", "-o", ".venv/.installed", "-o", "data/default/corpus.json", "train", "RUN=docs"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    [line] = [line for line in dry.stdout.splitlines() if "train.py" in line]
    args = shlex.split(line)[1:]
    assert args[0] == "train.py" and "curriculum=demo" in args, args
    extra = [f"run.dir={tmp_path / 'demo'}", "steps=10", "log_every=5", "checkpoint.every=5", *corpus_overrides(corpus)]
    proc = subprocess.run(
        [sys.executable, *args, *extra], cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DroPE from step" in proc.stderr + proc.stdout
