"""Entry point: `python train.py [overrides]` or `torchrun --nproc_per_node=N train.py [overrides]`; with
`dry_run=true`, prints the run's plan (nopetrain/plan.py) and exits."""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from nopetrain.config import ConfigError, TrainConfig, register_configs
from nopetrain.exits import run_refusing_composition_errors, task_started
from nopetrain.sweep import sweep_member

register_configs()


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    task_started()
    train_cfg = OmegaConf.to_object(cfg)
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        train_cfg = sweep_member(train_cfg, hydra_cfg.job.num, list(hydra_cfg.overrides.task))
    if train_cfg.dry_run:
        print_plan(train_cfg)
    else:
        run(train_cfg)


def fail(err: Exception, code: int) -> None:
    print(f"nopetrain: error: {err}", file=sys.stderr)
    sys.exit(code)


def print_plan(cfg: TrainConfig) -> None:
    # validate() needs no torch, which takes seconds to import: a refused config fails in the first second, in one
    # line. A model read from init_from's config.json is validated once it is read, in make_plan. The plan is
    # imported here, as the trainer is in run(): a dry run loads neither DeepSpeed nor the data pipeline.
    from nopetrain.config import planned_world_size, validate, validate_plan

    try:
        if cfg.init_from is None:
            world_size = planned_world_size(cfg)
            validate_plan(cfg.plan, world_size)
            validate(cfg, world_size)
        from nopetrain.plan import format_plan, make_plan

        print(format_plan(make_plan(cfg)))
    except ConfigError as err:
        fail(err, err.exit_code)


def run(cfg: TrainConfig) -> None:
    from nopetrain.exits import ExitError
    from nopetrain.preemption import Preempted
    from nopetrain.trainer import train

    try:
        train(cfg)
    except Preempted as stop:
        # Checkpointed and logged by the trainer; the job script requeues on this code.
        sys.exit(stop.exit_code)
    except ExitError as err:
        fail(err, err.exit_code)


if __name__ == "__main__":
    run_refusing_composition_errors(main)
