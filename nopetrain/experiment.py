"""Experiments: several training arms from one config, trained and then evaluated side by side.

    nopetrain-experiment drope_tiny [key=value ...]      # or a path to an experiment YAML

`configs/experiment/NAME.yaml` (schema: `ExperimentConfig`) names the corpus, the train.py overrides every arm
shares, the arms with their own overrides, and the evaluation (`nopetrain.eval` keys). The runner builds the corpus
when it is missing (the default corpus at the experiment's sequence length plus synthetic look-up documents),
trains the arms `parallel` at a time, each `python train.py` in its own process with its own log, then evaluates all
of them in one report: OUT/results.md, results.csv and the plots. Training resumes: an arm that already finished is
only checked (train.py says it has nothing to do), an interrupted one continues from its last checkpoint.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nopetrain.atomic import write_bytes
from nopetrain.checkpoint import checkpoint_root, complete_checkpoints, tag_for
from nopetrain.config import ConfigError
from nopetrain.data_pipelines.build_default import build_default
from nopetrain.data_pipelines.corpus_lookup import build_lookup
from nopetrain.data_pipelines.lookup_text import NIAH_TASKS
from nopetrain.eval.config import EvalConfig
from nopetrain.eval.config import validate as validate_eval
from nopetrain.eval.evaluate import evaluate
from nopetrain.eval.report import write_report
from nopetrain.exits import CRASHED, REFUSED, ExitError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "experiment"
SHORT_LOOKUP = "lookup_short"


@dataclass
class CorpusConfig:
    # Built with `nopetrain-data build-default` at this sequence length when path/corpus.json is missing.
    path: str = "???"
    seq_len: int = 256
    vocab_size: int = 4096
    max_mb_per_source: float = 4.0
    # Synthetic look-up documents (data_pipelines/corpus_lookup.py) added as source `lookup`; 0 for none.
    lookup_documents: int = 0
    # The NIAH tasks the look-up documents are drawn from, uniformly.
    lookup_tasks: list[str] = field(default_factory=lambda: list(NIAH_TASKS))
    # Digits of the look-ups' values; the evaluation's NIAH values (eval.niah.value_digits) must have as many.
    value_digits: int = 7
    # Look-up documents packed at short_seq_len as source `lookup_short` (train/lookup_short), for a curriculum phase
    # at that length while the look-up forms (its time grows with the context's length); 0 for none.
    short_lookup_documents: int = 0
    short_seq_len: int = 64
    seed: int = 0


@dataclass
class ArmConfig:
    # train.py overrides of this arm, applied after the shared ones.
    overrides: list[str] = field(default_factory=list)
    # Start from arm `from_arm`'s checkpoint at step `from_step` (which that arm then keeps) instead of from scratch:
    # for an arm whose first from_step steps are that arm's (DroPE: RoPE pretraining up to the drop, same data, seed
    # and schedule), so that they are trained once. train.py refuses the checkpoint if they are not.
    from_arm: str | None = None
    from_step: int | None = None


@dataclass
class ExperimentConfig:
    name: str = "???"
    out: str = "runs/experiments/${name}"
    # Values the other keys interpolate (`${params.NAME}`), so that a profile runs at another size with `params.NAME=`
    # on the command line (the GPU profile's CPU smoke run does).
    params: dict[str, Any] = field(default_factory=dict)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    # train.py overrides every arm shares.
    train: list[str] = field(default_factory=list)
    arms: dict[str, ArmConfig] = field(default_factory=dict)
    # Arms trained at once, each with threads_per_arm CPU threads (OMP_NUM_THREADS).
    parallel: int = 1
    threads_per_arm: int = 1
    # nopetrain.eval keys; the runner fills in `models` (one per arm), the report goes to `out`.
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(out="${out}"))


class ArmFailed(ExitError):
    """Arms whose training failed, by the exit codes of those that ran (an arm that waited on a failed one does not
    count): the experiment was refused (2) where each of them refused its config or data, else it crashed (1)."""

    def __init__(self, message: str, arm_exit_codes: list[int]) -> None:
        super().__init__(message)
        refused = bool(arm_exit_codes) and all(code == REFUSED for code in arm_exit_codes)
        self.exit_code = REFUSED if refused else CRASHED


def load_config(name: str, overrides: list[str]) -> ExperimentConfig:
    """configs/experiment/NAME.yaml (or a YAML file's path) on the schema, then `key=value` overrides; one-line
    errors name the key."""
    path = Path(name) if name.endswith(".yaml") else CONFIGS / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.yaml")))
        raise ConfigError(f"experiment {name!r}: no {path} (known: {known})")
    try:
        merged = OmegaConf.merge(
            OmegaConf.structured(ExperimentConfig), OmegaConf.load(path), OmegaConf.from_dotlist(overrides)
        )
        cfg: ExperimentConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(f"experiment {name}: {str(err).splitlines()[0]}") from err
    if not cfg.arms:
        raise ConfigError(f"experiment {name}: arms is empty")
    if cfg.parallel < 1 or cfg.threads_per_arm < 1:
        raise ConfigError(f"parallel={cfg.parallel} and threads_per_arm={cfg.threads_per_arm} must be >= 1")
    for arm, spec in cfg.arms.items():
        if (spec.from_arm is None) != (spec.from_step is None):
            raise ConfigError(f"arms.{arm}: set from_arm and from_step together")
        if spec.from_arm is not None and (spec.from_arm not in cfg.arms or spec.from_arm == arm):
            raise ConfigError(f"arms.{arm}.from_arm={spec.from_arm!r} must name another arm of {list(cfg.arms)}")
        if spec.from_arm is not None and cfg.arms[spec.from_arm].from_arm is not None:
            raise ConfigError(f"arms.{arm}.from_arm={spec.from_arm!r} starts from another arm itself")
    if cfg.corpus.lookup_documents and cfg.eval.niah.value_digits != cfg.corpus.value_digits:
        raise ConfigError(
            f"eval.niah.value_digits={cfg.eval.niah.value_digits} but the look-ups' values have "
            f"corpus.value_digits={cfg.corpus.value_digits} digits; set both"
        )
    cfg.eval.models = {arm: str(arm_dir(cfg, arm)) for arm in cfg.arms}
    validate_eval(cfg.eval)
    return cfg


def build_corpus(corpus: CorpusConfig) -> None:
    """Builds what of the corpus is missing; refuses one built with other settings than `corpus` asks for."""
    path = Path(corpus.path)
    summary_path = path / "corpus.json"
    if not summary_path.is_file():
        print(f"building the corpus {path} (seq_len {corpus.seq_len})", flush=True)
        build_default(
            path, corpus.seq_len, corpus.vocab_size, corpus.seed, corpus.max_mb_per_source, os.cpu_count() or 1
        )
    summary = json.loads(summary_path.read_text())
    built = {"seq_len": summary["seq_len"], "vocab_size": summary["tokenizer"]["vocab_size"], "seed": summary["seed"]}
    for key, value in built.items():
        if getattr(corpus, key) != value:
            raise ConfigError(
                f"corpus.{key}={getattr(corpus, key)} but {summary_path} was built with {value}; "
                "set corpus.path to a new folder (or remove this one)"
            )
    sources = [
        ("lookup", corpus.lookup_documents, None),
        (SHORT_LOOKUP, corpus.short_lookup_documents, corpus.short_seq_len),
    ]
    for name, documents, seq_len in sources:
        if not documents:
            continue
        wanted = {"documents": documents, "tasks": list(corpus.lookup_tasks), "seed": corpus.seed}
        wanted |= {"value_digits": corpus.value_digits, **({"seq_len": seq_len} if seq_len else {})}
        if name not in summary:
            where = f" at seq_len {seq_len}" if seq_len else ""
            print(f"adding {documents} look-up documents{where} ({', '.join(corpus.lookup_tasks)})", flush=True)
            build_lookup(path, documents, corpus.seed, list(corpus.lookup_tasks), corpus.value_digits, seq_len, name)
        # Corpora built before values had a length setting hold seven-digit values.
        elif {"value_digits": 7, **summary[name]} != wanted:
            raise ConfigError(
                f"corpus.{'short_' if seq_len else ''}lookup_documents/lookup_tasks/value_digits ask for {wanted} but "
                f"{summary_path} has {summary[name]}; set corpus.path to a new folder (or remove this one)"
            )


def arm_dir(cfg: ExperimentConfig, arm: str) -> Path:
    return Path(cfg.out) / "arms" / arm


def start_checkpoint(cfg: ExperimentConfig, spec: ArmConfig) -> Path | None:
    """The checkpoint an arm with `from_arm` starts from (None for the others)."""
    if spec.from_arm is None:
        return None
    return checkpoint_root(arm_dir(cfg, spec.from_arm)) / tag_for(spec.from_step)


def arm_command(cfg: ExperimentConfig, arm: str) -> list[str]:
    """train.py for `arm`: the shared overrides, the arm's, its run directory and, for an arm others start from, the
    steps to keep for them; an arm starting from another starts from its checkpoint unless it has its own (a
    resumed experiment)."""
    spec, run_dir = cfg.arms[arm], arm_dir(cfg, arm)
    command = [sys.executable, str(REPO / "train.py"), *cfg.train, *spec.overrides]
    command += [f"run.dir={run_dir}", f"run.name={cfg.name}-{arm}", f"wandb.group={cfg.name}"]
    kept = sorted({other.from_step for other in cfg.arms.values() if other.from_arm == arm})
    if kept:
        command.append(f"checkpoint.keep_steps=[{','.join(map(str, kept))}]")
    start = start_checkpoint(cfg, spec)
    if start is not None and not complete_checkpoints(checkpoint_root(run_dir)):
        command.append(f"checkpoint.resume={start}")
    return command


def train_arms(cfg: ExperimentConfig) -> None:
    """Runs train.py for every arm, `parallel` at a time, an arm with `from_arm` once that arm's checkpoint exists
    (published atomically: there whole or not at all); an arm that fails is named with its log after the arms
    already running have finished (their checkpoints are kept)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg.threads_per_arm))
    env.setdefault("WANDB_MODE", "offline")
    logs = Path(cfg.out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    pending = list(cfg.arms.items())
    running: dict[str, tuple[subprocess.Popen, Path, float]] = {}
    failed: list[str] = []
    exit_codes: list[int] = []
    while pending or running:
        waiting = {arm for arm, spec in pending if (start := start_checkpoint(cfg, spec)) and not start.is_dir()}
        for arm, spec in [(arm, spec) for arm, spec in pending if arm in waiting]:
            if spec.from_arm not in running and spec.from_arm not in dict(pending):
                pending.remove((arm, spec))
                failed.append(f"{arm} (arm {spec.from_arm} ended without {start_checkpoint(cfg, spec)})")
        startable = [(arm, spec) for arm, spec in pending if arm not in waiting]
        while startable and len(running) < cfg.parallel:
            arm, spec = startable.pop(0)
            pending.remove((arm, spec))
            command = arm_command(cfg, arm)
            log_file = logs / f"{arm}.log"
            with open(log_file, "a") as handle:
                running[arm] = (
                    subprocess.Popen(command, cwd=REPO, env=env, stdout=handle, stderr=handle),
                    log_file,
                    time.time(),
                )
            origin = f" from arm {spec.from_arm} at step {spec.from_step}" if spec.from_arm else ""
            print(f"training arm {arm}{origin}: {' '.join(spec.overrides)} (log {log_file})", flush=True)
        time.sleep(1)
        for arm, (process, log_file, started) in list(running.items()):
            if process.poll() is None:
                continue
            del running[arm]
            if process.returncode != 0:
                failed.append(f"{arm} (exit {process.returncode}, see {log_file})")
                exit_codes.append(process.returncode)
            else:
                print(f"arm {arm} done in {time.time() - started:.0f} s", flush=True)
    if failed:
        raise ArmFailed(f"experiment {cfg.name}: training failed for arm(s) {', '.join(failed)}", exit_codes)


def checkout_commit() -> str:
    """The checkout's commit, marked when it has uncommitted changes."""
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return f"{commit or 'unknown'}{' (with uncommitted changes)' if dirty else ''}"


def protocol(cfg: ExperimentConfig, argv: list[str], commit: str, seconds: dict[str, float]) -> str:
    """The run's provenance as a markdown section: command, date, machine, the commit it started from, wall times
    and the resolved experiment config (fixed before the run)."""
    machine = f"{platform.node()}: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    if torch.cuda.is_available():
        machine += f", {torch.cuda.get_device_name()}"
    times = ", ".join(f"{name} {value / 60:.1f} min" for name, value in seconds.items())
    return "\n".join(
        [
            "## Protocol",
            "",
            f"- command: `nopetrain-experiment {' '.join(argv)}`",
            f"- date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
            f"- machine: {machine}; torch {torch.__version__}",
            f"- commit at the start: {commit}",
            f"- wall time: {times}",
            "",
            "```yaml",
            OmegaConf.to_yaml(OmegaConf.structured(cfg)).rstrip(),
            "```",
            "",
        ]
    )


def run(cfg: ExperimentConfig, argv: list[str]) -> dict[str, Path]:
    """Corpus, training, evaluation; returns the report's files (results.md ends with the protocol)."""
    started, commit = time.time(), checkout_commit()
    build_corpus(cfg.corpus)
    train_arms(cfg)
    trained = time.time()
    print(f"trained {len(cfg.arms)} arms in {trained - started:.0f} s; evaluating", flush=True)
    rows = evaluate(cfg.eval)
    files = write_report(rows, cfg.out, cfg.eval.report, cfg.eval.wandb)
    done = time.time()
    seconds = {"corpus and training": trained - started, "evaluation": done - trained, "total": done - started}
    report = files["results.md"]
    write_bytes(report, (report.read_text() + "\n" + protocol(cfg, argv, commit, seconds)).encode())
    print(f"evaluated in {done - trained:.0f} s; total {done - started:.0f} s ({(done - started) / 60:.1f} min)")
    return files


USAGE = "usage: nopetrain-experiment NAME|PATH.yaml [key=value ...]"


def main(argv: list[str] | None = None) -> int:
    # The evaluation reports each model x method x length as it finishes (logger nopetrain.eval).
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        known = ", ".join(sorted(path.stem for path in CONFIGS.glob("*.yaml")))
        print(f"{USAGE}\n\n{__doc__.splitlines()[0]}\nexperiments in {CONFIGS}: {known}")
        return 0
    if not args or "=" in args[0]:
        print(USAGE, file=sys.stderr)
        return 2
    try:
        files = run(load_config(args[0], args[1:]), args)
    except ExitError as err:
        print(f"nopetrain-experiment: error: {err}", file=sys.stderr)
        return err.exit_code
    for kind, path in files.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
