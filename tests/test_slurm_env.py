"""SLURM's environment mapped to torch.distributed's (one task per GPU), with environments as srun sets them."""

from __future__ import annotations

import pytest

from nopetrain.config import ConfigError
from nopetrain.slurm import PORT_BASE, PORT_SPAN, expand_nodelist, loopback_warning, rank_env_from_slurm


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node07", ["node07"]),
        ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
        ("gpu-a[9-11],login1", ["gpu-a9", "gpu-a10", "gpu-a11", "login1"]),
        ("dgx[098-100].ib,cpu1", ["dgx098.ib", "dgx099.ib", "dgx100.ib", "cpu1"]),
        ("rack[1-2]-n[01,03]", ["rack1-n01", "rack1-n03", "rack2-n01", "rack2-n03"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["node[01-04", "node[a-b]"])
def test_bad_nodelist_names_it(nodelist):
    with pytest.raises(ConfigError, match=r"node\["):
        expand_nodelist(nodelist)


# Task 13 of 16 (two nodes x 8 GPUs), as srun sets it on the job's second node.
SRUN_TASK = {
    "SLURM_JOB_ID": "4242117",
    "SLURM_JOB_NODELIST": "gpu-h100-[017,021]",
    "SLURM_NODELIST": "gpu-h100-[017,021]",
    "SLURM_NNODES": "2",
    "SLURM_NTASKS": "16",
    "SLURM_PROCID": "13",
    "SLURM_LOCALID": "5",
    "SLURM_NODEID": "1",
}


def test_srun_task_becomes_a_rank():
    assert rank_env_from_slurm(SRUN_TASK) == {
        "RANK": "13",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "5",
        "MASTER_ADDR": "gpu-h100-017",
        "MASTER_PORT": str(PORT_BASE + 4242117 % PORT_SPAN),
    }


def test_explicit_master_port_and_addr_win():
    env = rank_env_from_slurm({**SRUN_TASK, "MASTER_PORT": "29500", "MASTER_ADDR": "10.0.0.5"})
    assert env["MASTER_PORT"] == "29500" and env["MASTER_ADDR"] == "10.0.0.5"


def test_torchrun_or_no_slurm_is_left_alone():
    # torchrun inside a SLURM task sets RANK for its workers: its mapping wins.
    assert rank_env_from_slurm({**SRUN_TASK, "RANK": "3", "LOCAL_RANK": "3", "WORLD_SIZE": "16"}) == {}
    assert rank_env_from_slurm({"HOME": "/root"}) == {}


def test_missing_nodelist_is_named():
    task = {key: value for key, value in SRUN_TASK.items() if "NODELIST" not in key}
    with pytest.raises(ConfigError, match="SLURM_JOB_NODELIST"):
        rank_env_from_slurm(task)


@pytest.mark.parametrize(
    ("environ", "address", "warned"),
    [
        ({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}, "127.0.1.1", True),  # torchrun, two nodes
        ({"WORLD_SIZE": "2", "SLURM_JOB_NUM_NODES": "2"}, "127.0.0.1", True),  # a task per rank, two nodes
        ({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}, "127.0.1.1", False),  # one node: loopback is right
        ({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}, "10.0.0.7", False),
        ({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "GLOO_SOCKET_IFNAME": "eth0"}, "127.0.1.1", False),
    ],
)
def test_a_multi_node_rank_on_a_loopback_hostname_is_told_which_variables_to_set(environ, address, warned):
    """Debian's /etc/hosts puts the host's own name on 127.0.1.1: gloo then announces it, and every multi-node start
    failed with `Gloo connectFullMesh failed ... remote=[127.0.1.1]`, with nothing pointing at the cause."""
    warning = loopback_warning("node1", address, environ)
    assert (warning is not None) == warned
    if warned:
        assert f"host node1 resolves to {address}" in warning and "GLOO_SOCKET_IFNAME" in warning
        assert "NCCL_SOCKET_IFNAME" in warning and "\n" not in warning
