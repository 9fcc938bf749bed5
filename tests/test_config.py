"""Bad configs fail at start with one line naming the key; good ones compose through real Hydra."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nopetrain.config import ConfigError, validate
from nopetrain.hf import pretrained_model

from .helpers import REPO, composed, subprocess_env


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["model.num_heads=3"], "model.num_heads"),
        (["model.num_kv_heads=3"], "model.num_kv_heads"),
        (["model.no_rope_layer_interval=-1"], "model.no_rope_layer_interval"),
        (["model.no_rope_layer_interval=null", "model.no_rope_layers=[1,0,1]"], "model.no_rope_layers"),
        (["model.no_rope_layers=[1,1,1,0]"], "model.no_rope_layer_interval and model.no_rope_layers"),
        (["model.qk_norm=k"], "model.qk_norm"),
        (["global_batch_size=12"], "global_batch_size"),
        (["deepspeed.stage=4"], "deepspeed.stage"),
        (["stop_at_step=500"], "stop_at_step"),
        (["optim.lr=-1"], "optim.lr=-1"),
        (["optim.grad_clip=-1"], "optim.grad_clip=-1"),
        (["optim.eps=0"], "optim.eps=0"),
    ],
)
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        validate(composed(*overrides), world_size=1)
    assert key in str(err.value)
    assert "\n" not in str(err.value)


def test_every_preset_and_zero_stage_validates():
    for preset in ["tiny", "smollm_135m", "smollm_360m", "smollm_1p7b", "smollm3_3b", "llama2_7b"]:
        for stage in ["zero1", "zero2", "zero3", "zero3_offload"]:
            validate(composed(f"model={preset}", f"deepspeed={stage}"), world_size=1)


def test_typo_in_a_key_fails_while_composing():
    with pytest.raises(Exception, match="hiden_size"):
        composed("model.hiden_size=64")


def run_cli(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "train.py", *overrides],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_prints_one_line_and_exits_2(tmp_path):
    proc = run_cli(f"run.dir={tmp_path}/run", "model.num_heads=3")
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("nopetrain: error:")]
    assert errors == ["nopetrain: error: model.num_heads=3 must divide model.hidden_size=128 (or set model.head_dim)"]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cli_unknown_preset_names_the_group(tmp_path):
    proc = run_cli(f"run.dir={tmp_path}/run", "model=smollm_9000b")
    assert proc.returncode == 2
    assert "Could not find 'model/smollm_9000b'" in proc.stderr.splitlines()[0]


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("modle=tiny", "modle"),  # an unknown key
        ("model.hidden_sise=128", "hidden_sise"),
        ("+modle=tiny", "modle"),  # added with +, as Hydra's own message suggests
        ("+model.hidden_sise=128", "model.hidden_sise"),
        ("deepspeed=zero9", "deepspeed/zero9"),  # an unknown group option
        ("data=nonexistent", "data/nonexistent"),
        ("steps=abc", "steps=abc"),  # a value of the wrong type
        ("seed=", "seed="),
    ],
)
def test_every_config_refusal_exits_2_hydras_own_included(tmp_path, override, named):
    """A job script or sweep driver reads 2 as "fix the config, do not retry": Hydra's composition errors exited 1."""
    proc = run_cli(f"run.dir={tmp_path}/run", override)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert named in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_run_dir_that_is_a_file_is_one_line(tmp_path):
    file = tmp_path / "run"
    file.write_text("not a folder")
    proc = run_cli(f"run.dir={file}")
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1] == f"nopetrain: error: run.dir={file} exists and is not a directory"
    assert "Traceback" not in proc.stderr


def test_missing_init_from_folder_names_the_key(tmp_path):
    with pytest.raises(ConfigError) as err:
        pretrained_model(composed(f"init_from=hf:{tmp_path}/nowhere"))
    assert str(err.value) == f"init_from=hf:{tmp_path}/nowhere: {tmp_path}/nowhere/config.json: not found"


def test_a_data_config_outside_the_repo_and_a_moved_corpus(tmp_path):
    # --config-dir puts a user's folder on Hydra's search path; data.root moves every source of a shipped config.
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.yaml").write_text(
        "name: mine\nkind: shards\nroot: /corpora/mine\nsources:\n  web: {path: '${data.root}/web', weight: 1.0}\n"
    )
    mine = [sys.executable, "train.py", "--config-dir", str(tmp_path), "data=mine", "--cfg", "job", "--resolve"]
    shipped = [sys.executable, "train.py", "data=default", "data.root=/scratch/default", "--cfg", "job", "--resolve"]
    for cmd, expected in [(mine, ["path: /corpora/mine/web"]), (shipped, ["path: /scratch/default/train/web"])]:
        proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert all(line in proc.stdout for line in expected), proc.stdout
