"""`nopetrain-eval checkpoint=runs/NAME out=DIR [key=value ...]` (or `python -m nopetrain.eval`): evaluates, writes the
report.

Keys are those of nopetrain/eval/config.py (defaults in configs/eval.yaml). A bad key fails while Hydra composes;
a bad value, checkpoint or data source stops with one line naming it and exit code 2.
"""

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from nopetrain.eval.config import register_configs
from nopetrain.eval.evaluate import evaluate
from nopetrain.eval.report import write_report
from nopetrain.exits import ExitError, run_refusing_composition_errors, task_started

register_configs()

# An absolute path: as the nopetrain-eval command, Hydra would resolve a relative one against the module's package
# (nopetrain.eval), not against this file.
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@hydra.main(version_base="1.3", config_path=str(CONFIGS), config_name="eval")
def main(cfg: DictConfig) -> None:
    task_started()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    eval_cfg = OmegaConf.to_object(cfg)
    try:
        rows = evaluate(eval_cfg)
    except ExitError as err:
        print(f"nopetrain-eval: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    files = write_report(rows, eval_cfg.out, eval_cfg.report, eval_cfg.wandb)
    print(f"wrote {', '.join(str(path) for path in files.values())}")


def cli() -> None:
    """The nopetrain-eval command: a config Hydra refuses exits 2, as a bad value does."""
    run_refusing_composition_errors(main)


if __name__ == "__main__":
    cli()
