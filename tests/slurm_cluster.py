"""A real SLURM cluster (munged + slurmctld + a slurmd per node, all on localhost) in a temporary directory, for
tests. One node is this host; several are node1, node2, ...: each slurmd runs in UTS and mount namespaces of its own
(`unshare`), with its node's hostname and an /etc/hosts that maps every node to 127.0.0.1, so its jobs see the host
they would on a real cluster while all traffic stays on the loopback interface.

Debian's slurm-wlm 22.05 runs here with process tracking by /proc (no cgroups), no task plugin, no accounting and
root as SlurmUser; cred_expire=10 and a 5 s scheduler interval let a requeued job start again after ~12 s instead
of ~160 s. Every daemon runs in the foreground as a child of the test process, so teardown can end each by pid.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nopetrain.parallel import free_port

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "squeue", "unshare")


def unavailable_reason() -> str | None:
    """Why a cluster cannot start here, or None."""
    missing = [name for name in BINARIES if shutil.which(name) is None]
    if missing:
        return f"SLURM/munge binaries missing ({', '.join(missing)}): `make slurm-deps` installs them (Debian, root)"
    if os.geteuid() != 0:
        return "a local SLURM cluster runs its daemons as root (SlurmUser=root); not root"
    return None


SLURM_CONF = """\
ClusterName=nopetrain-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket.2,cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=sched_interval=5,bf_interval=5
SlurmdParameters=config_overrides
ReturnToService=2
# A cancelled job's processes get SIGKILL 5 s after SIGTERM (default 30 s).
KillWait=5
MailProg=/bin/true
{node_lines}
# A job in `urgent` preempts those in `debug`: SIGTERM to their steps, requeued after the grace time if still running.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
PartitionName=debug Nodes={nodes} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=60
PartitionName=urgent Nodes={nodes} MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
"""


class SlurmCluster:
    def __init__(self, root: Path, cpus: int = 2, nodes: int = 1) -> None:
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.nodes = [self.host] if nodes == 1 else [f"node{index}" for index in range(1, nodes + 1)]
        self.cpus = cpus
        self.daemons: list[subprocess.Popen] = []
        self.env = dict(os.environ, SLURM_CONF=str(root / "slurm.conf"))

    def run(self, *cmd: str, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
        """A SLURM client command against this cluster."""
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60, cwd=cwd)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def _daemon(self, *cmd: str, log: str) -> None:
        with open(self.root / log, "ab") as out:
            self.daemons.append(subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT))

    def start(self) -> None:
        munge = self.root / "munge"
        munge.mkdir(mode=0o755, parents=True)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        (self.root / "state").mkdir()
        node_lines = [
            f"NodeName={node} NodeAddr=127.0.0.1 Port={free_port()} CPUs={self.cpus} State=UNKNOWN"
            for node in self.nodes
        ]
        for node in self.nodes:
            (self.root / "spool" / node).mkdir(parents=True)
        conf = SLURM_CONF.format(
            host=self.host, root=self.root, ctld_port=free_port(), slurmd_port=free_port(),
            node_lines="\n".join(node_lines), nodes=",".join(self.nodes),
        )  # fmt: skip
        (self.root / "slurm.conf").write_text(conf)
        self._daemon(
            "munged", "--foreground", "--force", f"--key-file={key}", f"--socket={munge}/munge.socket.2",
            f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log", f"--seed-file={munge}/munge.seed",
            log="munged.out",
        )  # fmt: skip
        self._wait_for(lambda: (munge / "munge.socket.2").exists(), "munged socket")
        self._daemon("slurmctld", "-D", "-c", "-f", str(self.root / "slurm.conf"), log="slurmctld.out")
        self._wait_for(lambda: self.run("scontrol", "ping", check=False).returncode == 0, "slurmctld")
        hosts = self.root / "hosts"
        hosts.write_text(f"127.0.0.1 localhost {self.host} {' '.join(self.nodes)}\n")
        for node in self.nodes:
            slurmd = ["slurmd", "-D", "-N", node, "-f", str(self.root / "slurm.conf")]
            if node != self.host:
                # Its own hostname and /etc/hosts, in namespaces its jobs inherit.
                script = f"hostname {node} && mount --bind {hosts} /etc/hosts && exec {shlex.join(slurmd)}"
                slurmd = ["unshare", "--uts", "--mount", "sh", "-c", script]
            self._daemon(*slurmd, log=f"slurmd-{node}.out")
        for node in self.nodes:
            self._wait_for(lambda node=node: self.node_state(node).startswith("IDLE"), f"node {node} idle")

    def node_state(self, node: str | None = None) -> str:
        out = self.run("scontrol", "show", "node", node or self.nodes[0], check=False).stdout
        match = re.search(r"State=(\S+)", out)
        return match.group(1) if match else ""

    def _wait_for(self, ready, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for daemon in self.daemons:
                if daemon.poll() is not None:
                    raise RuntimeError(f"{daemon.args[0]} exited {daemon.returncode}; logs in {self.root}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {what} after {timeout} s; logs in {self.root}")
            time.sleep(0.2)

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as key=value pairs (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_for_job(self, job_id: str, states: tuple[str, ...], timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while (job := self.job(job_id))["JobState"] not in states:
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {job['JobState']} after {timeout} s: {job}")
            time.sleep(0.5)
        return job

    def stop(self) -> None:
        """Cancels every job, waits for their processes to go, ends the daemons (slurmd last to start, first to
        stop), then kills whatever a job left behind."""
        if self.run("scontrol", "ping", check=False).returncode == 0:
            self.run("scancel", "--user=root", check=False)
            deadline = time.monotonic() + 20
            while self.run("squeue", "--noheader", check=False).stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.5)
        for daemon in reversed(self.daemons):
            daemon.terminate()
            try:
                daemon.wait(timeout=15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        for pid in self.job_processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def job_processes(self) -> list[int]:
        """Processes started for this cluster's jobs (slurmstepd, job scripts, ranks): they carry its SLURM_CONF."""
        marker = f"SLURM_CONF={self.env['SLURM_CONF']}".encode()
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                if marker in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
        return pids


@contextmanager
def slurm_cluster(root: Path, cpus: int = 2, nodes: int = 1) -> Iterator[SlurmCluster]:
    cluster = SlurmCluster(root, cpus, nodes)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
