"""torch.distributed's environment from SLURM's, for one task per GPU (`srun --ntasks-per-node=<GPUs> python
train.py`, or hydra/launcher=slurm): pure functions of the environment, so they are tested with real env dicts."""

from __future__ import annotations

import re
from collections.abc import Mapping

from nopetrain.config import ConfigError

# A default rendezvous port per job, so two jobs sharing a node do not collide: 20000-31999, below Linux's ephemeral
# range (32768-60999, net.ipv4.ip_local_port_range), where any outgoing connection may already hold the port.
PORT_BASE, PORT_SPAN = 20000, 12000

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top_level(text: str) -> list[str]:
    """Splits on commas outside brackets: 'a[1-2,5],b' -> ['a[1-2,5]', 'b']."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [part for part in parts if part]


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list in order: 'node[01-03,07],gpu-a1' -> node01 node02 node03 node07 gpu-a1.
    Zero padding follows the range's first number; several bracket groups in one name expand left to right."""
    hosts: list[str] = []
    for part in _split_top_level(nodelist):
        open_at = part.find("[")
        if open_at < 0:
            hosts.append(part)
            continue
        close_at = part.find("]", open_at)
        if close_at < 0:
            raise ConfigError(f"SLURM node list {nodelist!r}: unbalanced '[' in {part!r}")
        prefix, body, suffix = part[:open_at], part[open_at + 1 : close_at], part[close_at + 1 :]
        for item in body.split(","):
            match = _RANGE.match(item)
            if match is None:
                raise ConfigError(f"SLURM node list {nodelist!r}: {item!r} is not a number or a range")
            first, last = match.group(1), match.group(2) or match.group(1)
            for number in range(int(first), int(last) + 1):
                hosts.extend(expand_nodelist(f"{prefix}{number:0{len(first)}d}{suffix}"))
    return hosts


def rank_env_from_slurm(environ: Mapping[str, str]) -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT for a process SLURM started as one task of many;
    empty when a launcher already set RANK (torchrun) or the process is not a SLURM task."""
    if "RANK" in environ or "SLURM_PROCID" not in environ:
        return {}
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodelist:
        raise ConfigError("SLURM_PROCID is set but SLURM_JOB_NODELIST is not: cannot find the rendezvous host")
    port = environ.get("MASTER_PORT") or str(PORT_BASE + int(environ.get("SLURM_JOB_ID", "0")) % PORT_SPAN)
    return {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": environ.get("SLURM_NTASKS", "1"),
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": environ.get("MASTER_ADDR") or expand_nodelist(nodelist)[0],
        "MASTER_PORT": port,
    }


def loopback_warning(hostname: str, address: str, environ: Mapping[str, str]) -> str | None:
    """One line when a rank of a multi-node group would announce `hostname`, which resolves to `address`, a loopback
    address (Debian's /etc/hosts puts the host's own name on 127.0.1.1), and no interface is named: gloo picks its
    interface from the hostname, so the other nodes dial their own loopback (`Gloo connectFullMesh failed`)."""
    world = int(environ.get("WORLD_SIZE", "1"))
    local = int(environ.get("LOCAL_WORLD_SIZE", str(world)))
    nodes = int(environ.get("SLURM_JOB_NUM_NODES") or environ.get("SLURM_NNODES") or "1")
    if (world <= local and nodes <= 1) or "GLOO_SOCKET_IFNAME" in environ or not address.startswith("127."):
        return None
    return (
        f"host {hostname} resolves to {address}, a loopback address, and this group spans nodes: set "
        "GLOO_SOCKET_IFNAME (every job's gloo side group, a CPU job's whole traffic) and NCCL_SOCKET_IFNAME to the "
        "interface the nodes share, e.g. eth0"
    )
