"""The sbatch generator (nopetrain.launch.slurm) and its jobs on a real one-node SLURM cluster (tests/slurm_cluster.py):
a two-task job trains, a signalled job checkpoints, requeues itself and finishes with the losses of an uninterrupted
run, in both launch modes."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nopetrain.launch import slurm
from tests.helpers import REPO, corpus_overrides, losses, subprocess_env
from tests.slurm_cluster import SlurmCluster, slurm_cluster, unavailable_reason

# Two CPU processes, gloo, the tiny model on synthetic data in fp32; enough steps that a signal sent after step 3
# arrives well before the end.
STEPS = 60
TRAIN = [
    "precision=fp32",
    "data=synthetic",
    "curriculum=single",
    f"steps={STEPS}",
    "seq_len=64",
    "micro_batch_size=4",
    "global_batch_size=8",
    "log_every=1",
    "checkpoint.every=1000",
    "wandb.mode=offline",
]
CPU_JOB = [
    "--gpus-per-node=0",
    "--procs-per-node=2",
    "--cpus-per-rank=1",
    "--time=10",
    "--signal-grace=60",
    f"--workdir={REPO}",
]


def generator_args(tmp: Path, name: str, *options: str) -> list[str]:
    """The generator's options for a job NAME whose file, logs and run dir go under tmp."""
    return [
        f"--job-name={name}",
        f"--log-dir={tmp}",
        f"--run-dir={tmp / name}",
        f"--output={tmp / name}.sbatch",
        *options,
    ]


def generate(capsys, tmp: Path, name: str, *options: str) -> tuple[int, str]:
    """Runs the generator in this process (its CLI is run for real by the cluster tests): exit code and stderr."""
    code = slurm.main(generator_args(tmp, name, *options))
    return code, capsys.readouterr().err


def test_generated_file_has_the_directives_and_quotes_the_overrides(capsys, tmp_path):
    options = ["--nodes=2", "--gpus-per-node=8", "--partition=gpu", "--mode=torchrun", "--time=1-00:00:00"]
    options += ["--signal-grace=300", "--container-image=nvcr.io#org/nopetrain:1", "--env=NCCL_DEBUG=WARN"]
    code, err = generate(
        capsys, tmp_path, "gen", *options, "--", "model=smollm_360m", "wandb.tags=[a b]", "run.name=$HOME"
    )
    assert code == 0, err
    assert os.access(tmp_path / "gen.sbatch", os.X_OK)  # runnable by hand (bash is not needed in front of it)
    text = (tmp_path / "gen.sbatch").read_text()
    for directive in ("--job-name=gen", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=gpu",
                      "--cpus-per-task=32", "--time=1-00:00:00", "--requeue", "--signal=B:USR1@300",
                      "--open-mode=append", f"--output={tmp_path}/%x-%j.out", f"--chdir={REPO}"):  # fmt: skip
        assert f"\n#SBATCH {directive}\n" in text, directive
    assert "'wandb.tags=[a b]'" in text and "'run.name=$HOME'" in text  # literal, not expanded by the job's shell
    assert "'--container-image=nvcr.io#org/nopetrain:1'" in text and "export NCCL_DEBUG=WARN" in text
    assert '"--rdzv_endpoint=$MASTER_ADDR:$MASTER_PORT"' in text and "--nproc_per_node=8" in text
    assert "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in text and "--shutdown-timeout=300" in text
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1' in text
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    if shellcheck:
        # Warnings and errors; "info" would flag the deliberately literal $HOME above.
        check = subprocess.run(
            [shellcheck, "-S", "warning", str(tmp_path / "gen.sbatch")], capture_output=True, text=True
        )
        assert check.returncode == 0, check.stdout


def test_defaults_cpus_help_and_no_logs_folder_in_the_checkout(capsys, tmp_path, monkeypatch):
    # One CPU per task is SLURM's default: torchrun's eight ranks would share it.
    monkeypatch.chdir(tmp_path)
    output = tmp_path / "jobs" / "one.sbatch"
    assert slurm.main(["--job-name=one", f"--output={output}", f"--workdir={REPO}", "--gpus-per-node=8"]) == 0
    text = output.read_text()
    assert "\n#SBATCH --cpus-per-task=32\n" in text and f"\n#SBATCH --output={output.parent}/%x-%j.out\n" in text
    assert not (REPO / "logs" / "one.sbatch").exists() and (tmp_path / "jobs").is_dir()
    assert slurm.main(["--job-name=two", f"--output={output}", f"--workdir={REPO}", "--mode=task-per-gpu"]) == 0
    assert "\n#SBATCH --cpus-per-task=4\n" in output.read_text()
    with pytest.raises(SystemExit):
        slurm.main(["--help"])
    assert "(default: 4)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--time=soon"], "--time='soon'"),
        (["--time=10", "--signal-grace=600"], "--signal-grace=600"),
        (["--partition=a b"], "--partition='a b'"),
        (["--gpus-per-node=0"], "--procs-per-node"),
        (["--env=1X=2"], "--env 1X"),
        (["--env=WANDB_API_KEY=abc"], "--env WANDB_API_KEY=...: looks like a credential"),
        (["--env=HF_TOKEN=abc"], "--env HF_TOKEN=...: looks like a credential"),
        (["--env=DB_PASSWORD=abc"], "--env DB_PASSWORD"),
        (["--", "run.dir=/elsewhere"], "--run-dir"),
    ],
)
def test_bad_options_fail_with_one_line_and_write_nothing(capsys, tmp_path, options, message):
    code, err = generate(capsys, tmp_path, "bad", *options)
    assert code == 2
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "bad.sbatch").exists()


def job_preamble_env(job_file: Path, cpus_per_task: int, job_id: int) -> dict[str, str]:
    """What the job file's preamble (up to the run directory line) exports, run by bash with SLURM's variables for a
    task of `cpus_per_task` CPUs, OMP_NUM_THREADS unset (the suite's own setting would hide the file's)."""
    text = job_file.read_text()
    preamble = text[: text.index("RUN_DIR=")].replace(
        '"$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"', "node1"
    )
    env = {"PATH": os.environ["PATH"], "SLURM_CPUS_PER_TASK": str(cpus_per_task), "SLURM_JOB_ID": str(job_id)}
    proc = subprocess.run(["bash", "-c", preamble + "\nenv"], env=env, capture_output=True, text=True, check=True)
    return dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)


@pytest.mark.parametrize(
    ("mode", "procs", "threads"), [("torchrun", 8, 4), ("torchrun", 2, 16), ("task-per-gpu", 8, 32)]
)
def test_each_rank_gets_its_share_of_the_tasks_cpus(capsys, tmp_path, mode, procs, threads):
    """A torchrun task runs all of a node's ranks: 8 ranks x 32 threads on 32 CPUs oversubscribed the node."""
    code, err = generate(
        capsys, tmp_path, "threads", f"--mode={mode}", f"--procs-per-node={procs}", "--cpus-per-task=32"
    )
    assert code == 0, err
    assert job_preamble_env(tmp_path / "threads.sbatch", 32, 7)["OMP_NUM_THREADS"] == str(threads)


@pytest.mark.parametrize("mode", ["torchrun", "task-per-gpu"])
def test_a_failed_task_ends_the_step_and_the_port_is_outside_the_ephemeral_range(capsys, tmp_path, mode):
    code, err = generate(capsys, tmp_path, "ports", f"--mode={mode}")
    assert code == 0, err
    text = (tmp_path / "ports.sbatch").read_text()
    assert "\nsrun \\\n    --label \\\n    --kill-on-bad-exit=1 \\\n" in text, text
    assert "GLOO_SOCKET_IFNAME" in text
    # Linux's default ip_local_port_range is 32768-60999: outgoing connections take their ports from it.
    ports = {
        int(job_preamble_env(tmp_path / "ports.sbatch", 4, job_id)["MASTER_PORT"])
        for job_id in (0, 1, 11999, 12000, 39999, 123456789)
    }
    assert min(ports) >= 1024 and max(ports) < 32768, (min(ports), max(ports))


def test_time_limits_in_every_slurm_format():
    formats = {"90": 5400, "5:30": 330, "02:00:00": 7200, "1-2": 93600, "1-02:30": 95400, "2-00:00:10": 172810}
    assert {value: slurm.time_limit_seconds(value) for value in formats} == formats


# Real SLURM from here on.


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as running:
        yield running


def submit(cluster: SlurmCluster, tmp: Path, name: str, *options: str, train: list[str] = TRAIN) -> str:
    """Writes and submits the job with the generator's CLI, as a user does; returns the job id."""
    cmd = [sys.executable, "-m", "nopetrain.launch.slurm", *generator_args(tmp, name, *CPU_JOB, *options)]
    cmd += ["--submit", "--", *train]
    env = {**subprocess_env(), **cluster.env}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return re.search(r"submitted job (\d+)", proc.stdout).group(1)


def job_log(tmp: Path, name: str, job_id: str) -> str:
    return (tmp / f"{name}-{job_id}.out").read_text()


def wait_for_step(cluster: SlurmCluster, job_id: str, run_dir: Path, step: int) -> None:
    deadline = time.monotonic() + 120
    while not (run_dir / "metrics.jsonl").exists() or max(losses(run_dir), default=0) < step:
        assert cluster.job(job_id)["JobState"] in ("PENDING", "RUNNING"), cluster.job(job_id)
        assert time.monotonic() < deadline, f"job {job_id} logged no step {step} in 120 s"
        time.sleep(0.1)


def signal_after_step(
    cluster: SlurmCluster,
    job_id: str,
    run_dir: Path,
    step: int,
    scancel: tuple[str, ...] = ("--signal=USR1", "--batch"),
) -> None:
    """By default USR1 to the batch shell (as --signal=B:USR1 does before the time limit), once the run has logged
    `step`; `scancel` gives scancel's options instead."""
    wait_for_step(cluster, job_id, run_dir, step)
    cluster.run("scancel", *scancel, job_id)


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory) -> Path:
    """A two-task job (task-per-gpu mode) that runs to completion; its losses are the reference."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    job_id = submit(cluster, tmp, "straight", "--mode=task-per-gpu")
    job = cluster.wait_for_job(job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=180)
    assert job["JobState"] == "COMPLETED", job_log(tmp, "straight", job_id)
    return tmp / "straight"


@pytest.mark.slow
def test_two_task_job_trains_to_completion(uninterrupted):
    assert sorted(losses(uninterrupted)) == list(range(1, STEPS + 1))
    assert {f"rank_{rank:05d}.log" for rank in (0, 1)} <= {p.name for p in (uninterrupted / "logs").iterdir()}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["task-per-gpu", "torchrun"])
def test_signalled_job_checkpoints_requeues_and_resumes_exactly(cluster, uninterrupted, tmp_path, mode):
    job_id = submit(cluster, tmp_path, "preempted", f"--mode={mode}")
    run_dir = tmp_path / "preempted"
    signal_after_step(cluster, job_id, run_dir, step=3)
    job = cluster.wait_for_job(job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=180)
    log = job_log(tmp_path, "preempted", job_id)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", log
    assert "SIGUSR1, asking the ranks to checkpoint" in log and "requeueing" in log, log
    saved = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert len(saved) >= 2, saved  # the signal's checkpoint mid-run and the final one
    resumed, straight = losses(run_dir), losses(uninterrupted)
    assert sorted(resumed) == sorted(straight)
    # Two launches of the same run agree to float rounding (gloo's reduction order), as in tests/test_trainer.py.
    for step, loss in straight.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), f"step {step}"


@pytest.fixture(scope="module")
def shard_train(corpus) -> list[str]:
    """TRAIN on a real corpus through the default data config (DataLoader workers) instead of synthetic data."""
    return [override for override in TRAIN if override != "data=synthetic"] + corpus_overrides(corpus)


@pytest.fixture(scope="module")
def uninterrupted_on_shards(cluster, shard_train, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("uninterrupted_on_shards")
    job_id = submit(cluster, tmp, "straight", "--mode=task-per-gpu", train=shard_train)
    job = cluster.wait_for_job(job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=300)
    assert job["JobState"] == "COMPLETED", job_log(tmp, "straight", job_id)
    return tmp / "straight"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "scancel"),
    [
        # Preemption's signal: SIGTERM to the job steps (ranks, DataLoader workers, torchrun's agent), not the shell.
        ("task-per-gpu", ("--signal=TERM",)),
        ("torchrun", ("--signal=TERM",)),
        # SIGTERM to the batch shell alone, which passes it to the steps through SLURM.
        ("task-per-gpu", ("--signal=TERM", "--batch")),
        # --full signals srun too, which SIGKILLs its tasks in the same second (srun's signal thread turns SIGTERM
        # into SIGKILL and resets an inherited SIG_IGN; measured with slurm-wlm 22.05): no batch script can keep
        # SIGTERM from it. docs/reliability.md says so; this case notices if a SLURM version changes it.
        pytest.param(
            "task-per-gpu",
            ("--signal=TERM", "--full"),
            marks=pytest.mark.xfail(reason="srun turns SIGTERM into SIGKILL for its tasks", strict=True),
        ),
    ],
    ids=["task-per-gpu-steps", "torchrun-steps", "task-per-gpu-batch", "task-per-gpu-full"],
)
def test_scancel_sigterm_checkpoints_with_loader_workers(
    cluster, shard_train, uninterrupted_on_shards, tmp_path, mode, scancel
):
    job_id = submit(cluster, tmp_path, "cancelled", f"--mode={mode}", train=shard_train)
    run_dir = tmp_path / "cancelled"
    signal_after_step(cluster, job_id, run_dir, step=3, scancel=scancel)
    job = cluster.wait_for_job(job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=300)
    log = job_log(tmp_path, "cancelled", job_id)
    # scancel means stop: no requeue. torchrun's agent exits 1 when signalled, after its ranks exited 75.
    assert job["ExitCode"] == ("75:0" if mode == "task-per-gpu" else "1:0") and job["Restarts"] == "0", log
    assert "preempted by SIGTERM" in (run_dir / "logs" / "rank_00000.log").read_text(), log
    assert len(list((run_dir / "checkpoints").glob("step_*"))) == 1, log

    job_id = submit(cluster, tmp_path, "cancelled", f"--mode={mode}", train=shard_train)
    job = cluster.wait_for_job(job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=300)
    assert job["JobState"] == "COMPLETED", job_log(tmp_path, "cancelled", job_id)
    resumed, straight = losses(run_dir), losses(uninterrupted_on_shards)
    assert sorted(resumed) == sorted(straight)
    for step, loss in straight.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), f"step {step}"


@pytest.mark.slow
def test_preempted_job_checkpoints_requeues_and_resumes(cluster, shard_train, uninterrupted_on_shards, tmp_path):
    # SLURM's preemption (PreemptMode=REQUEUE, GraceTime): SIGTERM to the job's steps, DataLoader workers included.
    # The job ends within the grace time, so SLURM does not requeue it: the script must.
    job_id = submit(cluster, tmp_path, "preempted", "--mode=task-per-gpu", train=shard_train)
    run_dir = tmp_path / "preempted"
    wait_for_step(cluster, job_id, run_dir, step=3)
    urgent = cluster.run("sbatch", "--parsable", "--partition=urgent", "--ntasks=2", "--wrap=sleep 1", cwd=tmp_path)
    job = cluster.wait_for_job(urgent.stdout.strip(), ("COMPLETED", "FAILED", "CANCELLED"), timeout=120)
    assert job["JobState"] == "COMPLETED", job
    job = cluster.wait_for_job(job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=300)
    log = job_log(tmp_path, "preempted", job_id)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", log
    assert "after the ranks checkpointed for SIGTERM; requeueing" in log, log
    resumed, straight = losses(run_dir), losses(uninterrupted_on_shards)
    assert sorted(resumed) == sorted(straight)
    for step, loss in straight.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), f"step {step}"


def test_generated_task_command_trains_outside_slurm(tmp_path):
    """Where no SLURM can run, the command each task of a task-per-gpu job runs still trains for real: two
    processes with the variables srun and the batch script would give them."""
    reason = unavailable_reason()
    if reason is None:
        pytest.skip("a real SLURM cluster runs the generated file in the tests above")
    args = slurm.parse_args([*CPU_JOB, "--mode=task-per-gpu", f"--run-dir={tmp_path}", "--", *TRAIN])
    command = slurm.shell_command(slurm.task_command(slurm.job_from_args(args)))
    job_env = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "localhost"}
    job_env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29400 + os.getpid() % 500)}
    tasks = [
        subprocess.Popen(
            ["bash", "-c", command],
            cwd=REPO,
            env={**subprocess_env(), **job_env, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    errors = [task.communicate(timeout=300)[1] for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], errors[0][-3000:]
    assert sorted(losses(tmp_path)) == list(range(1, STEPS + 1))
