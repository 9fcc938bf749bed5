"""Entry point: `python train.py [overrides]` or `torchrun --nproc_per_node=N train.py [overrides]`."""

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from nopetrain.config import ConfigError, register_configs
from nopetrain.trainer import NonFiniteLossError, train

register_configs()


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        train(OmegaConf.to_object(cfg))
    except (ConfigError, NonFiniteLossError) as err:
        print(f"nopetrain: error: {err}", file=sys.stderr)
        sys.exit(2 if isinstance(err, ConfigError) else 3)


if __name__ == "__main__":
    main()
