"""Entry point: `python train.py [overrides]` or `torchrun --nproc_per_node=N train.py [overrides]`."""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from nopetrain.config import ConfigError, register_configs
from nopetrain.data.streaming import DataError
from nopetrain.ownership import RunDirInUse
from nopetrain.preemption import PREEMPTED_EXIT_CODE, Preempted
from nopetrain.sweep import sweep_member
from nopetrain.trainer import NonFiniteLossError, train

register_configs()


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    train_cfg = OmegaConf.to_object(cfg)
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        train_cfg = sweep_member(train_cfg, hydra_cfg.job.num, list(hydra_cfg.overrides.task))
    try:
        train(train_cfg)
    except (ConfigError, DataError, RunDirInUse, NonFiniteLossError) as err:
        print(f"nopetrain: error: {err}", file=sys.stderr)
        sys.exit(3 if isinstance(err, NonFiniteLossError) else 2)
    except Preempted:
        # Checkpointed and logged by the trainer; the job script requeues on this code.
        sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    main()
