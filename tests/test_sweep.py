"""Hydra sweeps: members get their own run directories and share a W&B group; the SLURM launcher group composes."""

from __future__ import annotations

import subprocess

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from omegaconf import OmegaConf

from nopetrain.config import TrainConfig, register_configs
from nopetrain.sweep import sweep_member

from .helpers import REPO, WANDB, losses, subprocess_env, train_command, wandb_runs


def test_sweep_member_gets_its_own_dir_and_the_sweep_group():
    cfg = TrainConfig()
    cfg.run.name, cfg.run.dir = "nope-sweep", "runs/nope-sweep"
    member = sweep_member(cfg, 3, ["optim.lr=1e-3"])
    assert (member.run.name, member.run.dir, member.wandb.group) == ("nope-sweep-3", "runs/nope-sweep/3", "nope-sweep")
    assert (member.run.sweep_member, member.run.sweep_overrides) == (3, ["optim.lr=1e-3"])
    cfg.wandb.group = "ablation"
    assert sweep_member(cfg, 0, []).wandb.group == "ablation"


def test_slurm_launcher_composes():
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["hydra/launcher=slurm", "hydra.launcher.nodes=2", "hydra.launcher.partition=gpu", "run.name=s"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert get_class(launcher._target_).__name__ == "SlurmLauncher"
    assert (launcher.nodes, launcher.partition) == (2, "gpu")
    assert launcher.tasks_per_node == launcher.gpus_per_node
    assert launcher.signal_delay_s > 0 and launcher.max_num_timeout > 0
    # The sweep's files (and submitit's) sit in the sweep's run directory, members in numbered subdirectories.
    assert OmegaConf.select(cfg, "hydra.sweep.dir") == "runs/s"
    assert str(launcher.submitit_folder).startswith("runs/s/")


@pytest.mark.slow
def test_local_sweep_runs_members_in_one_wandb_group(tmp_path):
    sweep_dir = tmp_path / "sweep"
    cmd = train_command(sweep_dir, "run.name=nope-sweep", "steps=2", WANDB, "model.no_rope_layer_interval=0,2")
    cmd.insert(cmd.index(str(REPO / "train.py")) + 1, "-m")  # before the overrides (argparse)
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {}
    for num, interval in ((0, 0), (1, 2)):
        member = sweep_dir / str(num)
        assert sorted(losses(member)) == [1, 2]
        assert f"no_rope_layer_interval: {interval}" in (member / "config.yaml").read_text()
        [runs[num]] = wandb_runs(member)
        # Each member says what it runs, on the console and in its W&B config.
        assert f"sweep member {num}: " in proc.stderr
        assert (
            f"model.no_rope_layer_interval={interval}" in proc.stderr.split(f"sweep member {num}: ")[1].split("\n")[0]
        )
        config = {item.key: item.value_json for item in runs[num].config.update}
        assert f"model.no_rope_layer_interval={interval}" in config["run"]
    assert {run.run_group for run in runs.values()} == {"nope-sweep"}
    assert [runs[0].display_name, runs[1].display_name] == ["nope-sweep-0", "nope-sweep-1"]
    assert runs[0].run_id != runs[1].run_id
