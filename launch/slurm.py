"""Writes (and optionally submits) a preemption-safe sbatch file for training on SLURM.

    nopetrain-slurm --nodes 2 --gpus-per-node 8 --time 24:00:00 --partition gpu \
        --mode torchrun --signal-grace 300 --submit -- model=smollm_360m deepspeed=zero2

Two layouts: `torchrun` (one task per node runs torchrun; c10d rendezvous on the job's first node) and
`task-per-gpu` (srun starts every rank; nopetrain/parallel.py maps SLURM_PROCID/NTASKS/LOCALID to torch's
variables). SLURM sends USR1 `--signal-grace` seconds before the time limit; the batch shell forwards it (and
SIGTERM) to the training step, whose ranks checkpoint and exit 75. The script requeues the job after USR1 and after
SLURM's preemption, not after `scancel --signal=TERM`. The run directory is fixed in the file, so the requeued job
resumes there (checkpoint.resume=auto, same W&B run id)."""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from nopetrain.atomic import write_bytes
from nopetrain.exits import PREEMPTED
from nopetrain.preemption import PREEMPTED_BY_FILE
from nopetrain.slurm import PORT_BASE, PORT_SPAN

MODES = ("torchrun", "task-per-gpu")
# CPUs a training process gets by default: the process, its DataLoader workers (one per source) and the host work.
CPUS_PER_RANK = 4
# SLURM's --time formats: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
_TIME = re.compile(r"^(\d+-)?\d+(:\d+){0,2}$")
# Values written into #SBATCH lines, which sbatch reads without a shell: no spaces, quotes or newlines.
_DIRECTIVE_VALUE = re.compile(r"^[\w.,:/@%+=\-\[\]]+$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Names of credentials, which --env would write into the job file (readable, and kept by SLURM with the job).
_CREDENTIAL_NAME = re.compile(r"(_API_KEY|_TOKEN)$|SECRET|PASSWORD|PASSWD", re.IGNORECASE)

NCCL_NOTES = """\
# NCCL and gloo on a multi-node cluster (export here or in the submitting shell; sbatch passes the environment on):
#   GLOO_SOCKET_IFNAME=eth0       interface for gloo: every job's side group (the preemption vote), and all of a CPU
#                                 job's traffic; needed where a node's hostname resolves to a loopback address
#   NCCL_SOCKET_IFNAME=ib0,eth0   interface for NCCL's bootstrap and socket transport (default: first non-lo one)
#   NCCL_IB_HCA=mlx5              InfiniBand adapters to use; NCCL_IB_DISABLE=1 forces TCP sockets
#   NCCL_DEBUG=INFO               prints the transport NCCL chose per peer (WARN once the set-up works)
#   TORCH_NCCL_ASYNC_ERROR_HANDLING=1  a hung or failed collective aborts the rank instead of hanging the job
#   NCCL_NET_GDR_LEVEL, NCCL_CROSS_NIC: leave at NCCL's defaults unless the cluster's documentation says otherwise"""


class LaunchError(ValueError):
    """A bad option: reported as one line, exit code 2."""


@dataclass(frozen=True)
class SlurmJob:
    """Everything the sbatch file depends on; `render` turns it into the file's text."""

    job_name: str
    nodes: int
    procs_per_node: int
    gpus_per_node: int
    mode: str
    time: str
    signal_grace: int
    run_dir: str
    workdir: Path
    log_dir: str
    python: str
    overrides: list[str] = field(default_factory=list)
    partition: str | None = None
    account: str | None = None
    cpus_per_task: int | None = None
    container_image: str | None = None
    container_mounts: str | None = None
    container_workdir: str = "/workspace"
    env: dict[str, str] = field(default_factory=dict)
    sbatch_args: list[str] = field(default_factory=list)


def time_limit_seconds(value: str) -> int:
    """Seconds in a SLURM --time value."""
    if not _TIME.match(value):
        raise LaunchError(f"--time={value!r}: expected minutes, MM:SS, HH:MM:SS or D-HH[:MM[:SS]]")
    days, _, clock = value.rpartition("-")
    parts = [int(part) for part in clock.split(":")]
    if days:
        hours, minutes, seconds = [*parts, 0, 0][:3]
    else:
        hours, minutes, seconds = [0, parts[0], 0] if len(parts) == 1 else [0] * (3 - len(parts)) + parts
    return int(days or 0) * 86400 + hours * 3600 + minutes * 60 + seconds


def validate(job: SlurmJob) -> None:
    """Raises LaunchError naming the first bad option."""
    if job.mode not in MODES:
        raise LaunchError(f"--mode={job.mode!r}: expected one of {', '.join(MODES)}")
    for name, value in (("--nodes", job.nodes), ("--procs-per-node", job.procs_per_node)):
        if value < 1:
            raise LaunchError(f"{name}={value}: must be at least 1")
    if job.gpus_per_node < 0:
        raise LaunchError(f"--gpus-per-node={job.gpus_per_node}: must be 0 or more")
    limit = time_limit_seconds(job.time)
    if not 0 < job.signal_grace < min(limit, 65536):
        raise LaunchError(f"--signal-grace={job.signal_grace}: must be between 1 s and the time limit ({limit} s)")
    directives = {"--job-name": job.job_name, "--time": job.time, "--partition": job.partition}
    directives |= {"--account": job.account, "--workdir": str(job.workdir), "--log-dir": job.log_dir}
    for name, value in directives.items():
        if value is not None and not _DIRECTIVE_VALUE.match(value):
            raise LaunchError(f"{name}={value!r}: no spaces, quotes or shell characters allowed")
    for name in job.env:
        if not _ENV_NAME.match(name):
            raise LaunchError(f"--env {name}=...: not a shell variable name")
        if _CREDENTIAL_NAME.search(name):
            raise LaunchError(
                f"--env {name}=...: looks like a credential, which would be written into the job file; export it in "
                "the shell you submit from instead (sbatch passes the environment on)"
            )
    for override in job.overrides:
        if override.startswith(("run.dir=", "+run.dir=", "++run.dir=")):
            raise LaunchError(f"{override!r}: set the run directory with --run-dir (it must not change on requeue)")
    if job.container_image is None and not (job.workdir / "train.py").is_file():
        raise LaunchError(f"--workdir={job.workdir}: no train.py there (run from the nopetrain checkout)")


def _directives(job: SlurmJob) -> list[str]:
    tasks_per_node = 1 if job.mode == "torchrun" else job.procs_per_node
    lines = [f"--job-name={job.job_name}", f"--nodes={job.nodes}", f"--ntasks-per-node={tasks_per_node}"]
    if job.gpus_per_node:
        lines.append(f"--gpus-per-node={job.gpus_per_node}")
    if job.cpus_per_task:
        lines.append(f"--cpus-per-task={job.cpus_per_task}")
    lines.append(f"--time={job.time}")
    lines += [f"--{key}={value}" for key, value in (("partition", job.partition), ("account", job.account)) if value]
    lines += [
        # Requeue on preemption or by the script itself; B: signals only the batch shell, which forwards it.
        "--requeue",
        f"--signal=B:USR1@{job.signal_grace}",
        # One log per job id: a requeued job appends to the same file.
        "--open-mode=append",
        f"--output={job.log_dir}/%x-%j.out",
        f"--chdir={job.workdir}",
        *job.sbatch_args,
    ]
    return [f"#SBATCH {line}" for line in lines]


def srun_command(job: SlurmJob) -> list[str]:
    """srun and its options: one task per rank (task-per-gpu) or per node (torchrun)."""
    # A rank (or a torchrun agent, whose rank failed) that exits with an error leaves the others waiting in a
    # collective: end the whole step. A preempted step's tasks exit only after the checkpoint's last collective.
    srun = ["srun", "--label", "--kill-on-bad-exit=1"]
    if job.container_image:
        srun += [f"--container-image={job.container_image}", f"--container-workdir={job.container_workdir}"]
        if job.container_mounts:
            srun.append(f"--container-mounts={job.container_mounts}")
    return srun


class Expand(str):
    """A command word the batch shell expands ($SLURM_... variables): written double-quoted, not single-quoted."""


def task_command(job: SlurmJob) -> list[str]:
    """What each srun task runs: train.py (task-per-gpu), or torchrun, whose agents meet on the job's first node
    (torchrun)."""
    train = ["train.py", f"run.dir={job.run_dir}", *job.overrides]
    if job.mode == "task-per-gpu":
        return [job.python, *train]
    torchrun = [
        job.python,
        "-m",
        "torch.distributed.run",
        Expand("--nnodes=$SLURM_JOB_NUM_NODES"),
        f"--nproc_per_node={job.procs_per_node}",
        "--rdzv_backend=c10d",
        Expand("--rdzv_endpoint=$MASTER_ADDR:$MASTER_PORT"),
        Expand("--rdzv_id=$SLURM_JOB_ID"),
        "--max_restarts=0",
        # The agent forwards only these signals to its workers (this flag overrides TORCHELASTIC_SIGNALS_TO_HANDLE),
        # then kills workers still running after the timeout: the whole grace period, not torchrun's 30 s.
        "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
        f"--shutdown-timeout={job.signal_grace}",
    ]
    return [*torchrun, *train]


def shell_command(words: list[str]) -> str:
    """`words` as one shell command, an argument per line."""
    return " \\\n    ".join(f'"{word}"' if isinstance(word, Expand) else shlex.quote(word) for word in words)


def render(job: SlurmJob, command_line: str) -> str:
    """The sbatch file's text."""
    env = [f"export {name}={shlex.quote(value)}" for name, value in job.env.items()]
    step = shell_command([*srun_command(job), *task_command(job)])
    return TEMPLATE.format(
        command_line=command_line,
        directives="\n".join(_directives(job)),
        nccl_notes=NCCL_NOTES,
        env="".join(f"{line}\n" for line in env),
        run_dir=shlex.quote(job.run_dir),
        step=step,
        requeue_code=PREEMPTED,
        preempted_by=PREEMPTED_BY_FILE,
        port_base=PORT_BASE,
        port_span=PORT_SPAN,
        ranks_per_task=job.procs_per_node if job.mode == "torchrun" else 1,
    )


TEMPLATE = """\
#!/bin/bash
# Written by: {command_line}
{directives}

{nccl_notes}

set -uo pipefail
# Each rank's share of the CPUs its task was given (a torchrun task runs {ranks_per_task} ranks), unless set already.
threads=$((${{SLURM_CPUS_PER_TASK:-1}} / {ranks_per_task}))
export OMP_NUM_THREADS="${{OMP_NUM_THREADS:-$((threads > 0 ? threads : 1))}}"
# Rendezvous on the job's first node; the port follows the job id so two jobs sharing a node do not collide.
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"
MASTER_PORT=$(({port_base} + SLURM_JOB_ID % {port_span}))
export MASTER_ADDR MASTER_PORT
{env}RUN_DIR={run_dir}
echo "job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}}) on $SLURM_JOB_NODELIST"
echo "rendezvous $MASTER_ADDR:$MASTER_PORT"
echo "run dir $RUN_DIR; per-rank logs in $RUN_DIR/logs/"

# On USR1 (--signal, before the time limit) or SIGTERM each rank finishes its step, writes a checkpoint, records
# the signal in $RUN_DIR/{preempted_by} and exits {requeue_code}. Preemption and `scancel --signal=TERM` signal the
# job steps (ranks, their DataLoader workers, torchrun's agent), not this shell; USR1 and `scancel --batch` signal
# this shell, which passes the signal on. SIGTERM to srun itself (`scancel --full`, the time limit) ends the step at
# once: srun turns it into SIGKILL for its tasks, and no option changes that. Hence USR1 --signal-grace seconds
# before the time limit.
# shellcheck disable=SC2329  # called by the traps
forward() {{
    echo "job $SLURM_JOB_ID: SIG$1, asking the ranks to checkpoint"
    if [ "$1" = TERM ]; then
        scancel --signal=TERM "$SLURM_JOB_ID"
    else
        kill -s "$1" "$step_pid" 2>/dev/null
    fi
}}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

rm -f "$RUN_DIR/{preempted_by}"
{step} &
step_pid=$!
# A trapped signal interrupts `wait`; wait again until the step has really ended.
rc=0
wait "$step_pid" || rc=$?
while kill -0 "$step_pid" 2>/dev/null; do
    rc=0
    wait "$step_pid" || rc=$?
done

# Requeue after the ranks checkpointed for USR1/USR2 (the time limit is near) or for SLURM's preemption (the job
# would not come back if it ended within the grace time); not after `scancel --signal=TERM`, which means stop.
# torchrun's agent exits 1 when signalled, though its ranks exited {requeue_code}: the record says what happened.
preempted_by="$(cat "$RUN_DIR/{preempted_by}" 2>/dev/null || true)"
if [ -n "$preempted_by" ] && {{ [ "$preempted_by" != SIGTERM ] ||
    scontrol show job "$SLURM_JOB_ID" | grep -Eq 'PreemptTime=[0-9]'; }}; then
    echo "job $SLURM_JOB_ID: step exited $rc after the ranks checkpointed for $preempted_by; requeueing"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
echo "job $SLURM_JOB_ID: step exited $rc${{preempted_by:+ after the ranks checkpointed for $preempted_by}}"
exit "$rc"
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="nopetrain-slurm",
        description="Write (and optionally submit) a preemption-safe sbatch file; Hydra overrides go after --.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8, help="0 on CPU-only nodes")
    parser.add_argument("--procs-per-node", type=int, help="training processes per node (default: --gpus-per-node)")
    parser.add_argument("--mode", choices=MODES, default="torchrun")
    parser.add_argument("--time", default="24:00:00", help="SLURM time limit")
    parser.add_argument("--signal-grace", type=int, default=300, help="seconds before the limit to checkpoint")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument(
        "--cpus-per-rank",
        type=int,
        default=CPUS_PER_RANK,
        help="CPUs per training process (its DataLoader workers and host work); sets --cpus-per-task",
    )
    parser.add_argument("--cpus-per-task", type=int, help="(default: --cpus-per-rank x the ranks one task runs)")
    parser.add_argument("--job-name", default="nopetrain")
    parser.add_argument("--run-dir", help="fixed across requeues, on a shared file system (default: runs/JOB_NAME)")
    parser.add_argument("--workdir", type=Path, default=Path.cwd(), help="the nopetrain checkout (default: cwd)")
    parser.add_argument(
        "--log-dir",
        help="job logs LOG_DIR/JOB_NAME-JOB_ID.out, relative to workdir (default: the --output file's folder, "
        "else logs)",
    )
    parser.add_argument("--python", help="interpreter on the nodes (default: this one; `python` in a container)")
    parser.add_argument("--container-image", help="pyxis/enroot image, e.g. registry#nopetrain:latest")
    parser.add_argument("--container-mounts", help="pyxis mounts, e.g. /shared/runs:/workspace/runs")
    parser.add_argument("--container-workdir", default="/workspace")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="exported in the job")
    parser.add_argument("--sbatch-arg", action="append", default=[], help="extra #SBATCH option, e.g. --exclusive")
    parser.add_argument("--output", type=Path, help="the sbatch file (default: LOG_DIR/JOB_NAME.sbatch)")
    parser.add_argument("--submit", action="store_true", help="run sbatch on the written file")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for train.py")
    return parser.parse_args(argv)


def job_from_args(args: argparse.Namespace) -> SlurmJob:
    env = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep:
            raise LaunchError(f"--env {item!r}: expected NAME=VALUE")
        env[name] = value
    workdir = args.workdir.resolve()
    procs = args.procs_per_node if args.procs_per_node is not None else args.gpus_per_node
    if procs < 1:
        raise LaunchError("--procs-per-node: required when --gpus-per-node is 0")
    python = args.python or ("python" if args.container_image else sys.executable)
    if args.cpus_per_rank < 1:
        raise LaunchError(f"--cpus-per-rank={args.cpus_per_rank}: must be at least 1")
    # torchrun runs every rank of a node in one task; SLURM would give that task one CPU by default.
    ranks_per_task = procs if args.mode == "torchrun" else 1
    log_dir = args.log_dir or (str(args.output.absolute().parent) if args.output else "logs")
    job = SlurmJob(
        job_name=args.job_name,
        nodes=args.nodes,
        procs_per_node=procs,
        gpus_per_node=args.gpus_per_node,
        mode=args.mode,
        time=args.time,
        signal_grace=args.signal_grace,
        run_dir=args.run_dir or f"runs/{args.job_name}",
        workdir=workdir,
        log_dir=log_dir,
        python=python,
        overrides=list(args.overrides),
        partition=args.partition,
        account=args.account,
        cpus_per_task=args.cpus_per_task or args.cpus_per_rank * ranks_per_task,
        container_image=args.container_image,
        container_mounts=args.container_mounts,
        container_workdir=args.container_workdir,
        env=env,
        sbatch_args=list(args.sbatch_arg),
    )
    validate(job)
    return job


def submit(path: Path, workdir: Path) -> str:
    """sbatch `path`; returns the job id."""
    proc = subprocess.run(["sbatch", "--parsable", str(path)], cwd=workdir, capture_output=True, text=True)
    if proc.returncode != 0:
        raise LaunchError(f"sbatch {path}: {proc.stderr.strip() or f'exit code {proc.returncode}'}")
    return proc.stdout.strip().split(";")[0]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
        job = job_from_args(args)
        log_dir = job.workdir / job.log_dir
        output = args.output or log_dir / f"{job.job_name}.sbatch"
        # Newlines in an argument would end the comment line that records the command.
        command_line = shlex.join(["nopetrain-slurm", *argv]).replace("\n", " ")
        output.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(output, render(job, command_line).encode(), mode=0o755)
        # SLURM does not create the directory of --output; a job whose log cannot be opened fails silently.
        log_dir.mkdir(parents=True, exist_ok=True)
        print(f"wrote {output}")
        if args.submit:
            print(f"submitted job {submit(output, job.workdir)}")
    except LaunchError as err:
        print(f"nopetrain-slurm: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
