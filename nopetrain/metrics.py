"""Training metrics: model FLOPs, MFU, memory, the console progress bar and W&B.

The step loop keeps running sums on the device; they are read back (one sync) every `log_every` steps.
"""

from __future__ import annotations

import contextlib
import json
import logging
import resource
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from nopetrain.atomic import write_bytes
from nopetrain.config import ModelConfig, TrainConfig

log = logging.getLogger("nopetrain")


@dataclass(frozen=True)
class GpuSpec:
    bf16_tflops: float  # dense peak, from the vendor's data sheet
    fp32_tflops: float
    memory_gib: float  # device memory as the driver reports it (nvidia-smi's total), in GiB


# The first entry all of whose words appear in the device's name (any case) wins, so more specific names come first:
# "A100 40GB" matches "NVIDIA A100-SXM4-40GB", "A100" every other A100. Memory: H100 and H200 as nvidia-smi showed
# them on the machines lent here (81,559 and 143,771 MiB); the others from the data sheets (GB taken as GiB, as
# nvidia-smi shows an A100's 40,960 and 81,920 MiB). `peak_tflops` in the config overrides the peak.
GPUS: list[tuple[str, GpuSpec]] = [
    ("H100 PCIe", GpuSpec(756.0, 51.0, 79.6)),
    ("H100 NVL", GpuSpec(835.0, 60.0, 94.0)),
    ("GH200", GpuSpec(989.0, 67.0, 96.0)),
    ("H100", GpuSpec(989.0, 67.0, 79.6)),
    ("H200", GpuSpec(989.0, 67.0, 140.4)),
    ("B200", GpuSpec(2250.0, 80.0, 180.0)),
    ("A100 40GB", GpuSpec(312.0, 19.5, 40.0)),
    ("A100", GpuSpec(312.0, 19.5, 80.0)),
    ("L40S", GpuSpec(362.0, 91.6, 48.0)),
    ("A10G", GpuSpec(70.0, 31.2, 24.0)),
]


def gpu_spec(name: str) -> GpuSpec | None:
    """The GPUS entry for a device `name` (a CUDA device name or plan.gpu), or None."""
    words = name.lower()
    for key, spec in GPUS:
        if all(word in words for word in key.lower().split()):
            return spec
    return None


METRICS_FILE = "metrics.jsonl"

# The console line; everything else (per-source counters, skipped steps, ...) goes to W&B and metrics.jsonl.
CONSOLE_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_device", "mfu", "memory_gib", "phase")


def peak_tflops(device: torch.device, bf16: bool, override: float | None) -> float | None:
    """Peak dense TFLOP/s of one device, or None where it is unknown (CPUs, unlisted GPUs)."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    return named_peak_tflops(torch.cuda.get_device_name(device), bf16)


def named_peak_tflops(name: str, bf16: bool) -> float | None:
    """Peak dense TFLOP/s of the GPUS entry for device `name`, or None."""
    spec = gpu_spec(name)
    if spec is None:
        return None
    return spec.bf16_tflops if bf16 else spec.fp32_tflops


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token, forward + backward: 6 x matmul parameters plus the attention scores
    (12 x layers x heads x head_dim x keys attended, the PaLM/Megatron convention, not halved for causality).
    The input embedding is a lookup and is not counted; the LM head is."""
    d, head_dim = cfg.hidden_size, cfg.resolved_head_dim
    attn_params = d * head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    mlp_params = 3 * d * cfg.intermediate_size
    matmul_params = cfg.num_layers * (attn_params + mlp_params) + d * cfg.vocab_size
    keys_attended = sum(
        min(seq_len, cfg.sliding_window) if use_rope and cfg.sliding_window else seq_len
        for use_rope in cfg.rope_layers()
    )
    return 6.0 * matmul_params + 12.0 * cfg.num_heads * head_dim * keys_attended


def memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class MetricsLogger:
    """Console lines, a progress bar on a terminal, run.dir/metrics.jsonl (full precision) and W&B; rank 0 only."""

    def __init__(self, cfg: TrainConfig, run_id: str, config_dict: dict[str, Any], start_step: int, enabled: bool):
        self.enabled = enabled
        self.run = None
        self.bar = None
        self.jsonl = None
        if not enabled:
            return
        self.jsonl = open(Path(cfg.run.dir) / METRICS_FILE, "a")  # noqa: SIM115 - closed in close()
        self.bar = tqdm(total=cfg.steps, initial=start_step, unit="step", dynamic_ncols=True, disable=None)
        if cfg.wandb.mode != "disabled":
            import wandb

            self.run = wandb.init(
                project=cfg.wandb.project,
                entity=cfg.wandb.entity,
                group=cfg.wandb.group,
                tags=list(cfg.wandb.tags),
                name=cfg.run.name,
                id=run_id,
                resume="allow",
                mode=cfg.wandb.mode,
                dir=cfg.run.dir,
                config=config_dict,
            )

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._to_wandb(lambda run: run.log(metrics, step=step))
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        keys = [*CONSOLE_KEYS, *sorted(k for k in metrics if k.startswith("eval/"))]
        line = "  ".join(f"{k}={_fmt(metrics[k])}" for k in keys if k in metrics)
        if self.bar is not None and not self.bar.disable:
            self.bar.set_postfix_str(
                f"loss={_fmt(metrics['loss'])} tok/s={_fmt(metrics['tokens_per_s'])}", refresh=False
            )
            self.bar.write(f"step {step}  {line}", file=sys.stderr)
        else:
            log.info("step %d  %s", step, line)

    def event(self, message: str) -> None:
        if self.enabled:
            log.info(message)

    def mark(self, step: int, name: str, message: str) -> None:
        """A run event (phase change, DroPE switch): console, metrics.jsonl, and a W&B marker metric `event/NAME`."""
        if not self.enabled:
            return
        log.info(message)
        self.jsonl.write(json.dumps({"step": step, "event": name, "message": message}) + "\n")
        self.jsonl.flush()
        self._to_wandb(lambda run: run.log({f"event/{name}": 1.0}, step=step))

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.bar is not None:
            self.bar.close()
        self._to_wandb(lambda run: run.finish())

    def _to_wandb(self, call: Callable[[Any], None]) -> None:
        """Calls W&B with the run, if there is one. W&B's service (wandb-core) is a process of its own that SLURM
        signals with the job (preemption, scancel, the time limit) and that exits on SIGTERM; without it the run
        goes on, metrics.jsonl keeps every row, and the next start continues the same W&B run."""
        if self.run is None:
            return
        import wandb

        try:
            call(self.run)
        except (OSError, wandb.errors.Error) as error:
            log.warning("W&B stopped (%s: %s); metrics go on to %s only", type(error).__name__, error, METRICS_FILE)
            self.run = None
            # Drops W&B's exit hook, which would print the same error again at exit.
            with contextlib.suppress(OSError, wandb.errors.Error):
                wandb.teardown()


def set_aside_rows(run_dir: Path, step: int, folder: Path) -> int:
    """Moves the rows of run_dir/metrics.jsonl that come after `step` into folder/metrics.jsonl, so that a run
    resumed at `step` appends to a history that ends there; returns how many rows moved."""
    path = run_dir / METRICS_FILE
    if not path.exists():
        return 0
    kept, later = [], []
    for line in path.read_text().splitlines(keepends=True):
        row = json.loads(line)
        # A step's metrics are logged after it; an event at step N (phase, DroPE) before step N + 1 runs.
        after = row["step"] > step or (row["step"] == step and "event" in row)
        (later if after else kept).append(line)
    if later:
        folder.mkdir(parents=True, exist_ok=True)
        # The copy first: a crash between the two writes duplicates rows, never loses them.
        (folder / METRICS_FILE).write_text("".join(later))
        write_bytes(path, "".join(kept).encode())
    return len(later)


def _fmt(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class ConsoleHandler(logging.Handler):
    """Writes log lines through tqdm, which clears the progress bar, prints the line and redraws the bar below it,
    so that no line is glued onto the bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging's contract: report, never raise
            self.handleError(record)


def setup_logging(rank: int, run_dir: Path) -> None:
    """Rank 0 logs INFO to the console; every rank logs to run_dir/logs/rank_N.log."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    formatter = logging.Formatter("%(asctime)s rank%(rank)s %(levelname)s %(message)s", "%H:%M:%S")
    console = ConsoleHandler()
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    file = logging.FileHandler(run_dir / "logs" / f"rank_{rank:05d}.log")
    for handler in (console, file):
        handler.setFormatter(formatter)
        handler.addFilter(lambda record: setattr(record, "rank", rank) or True)
    log.handlers[:] = [console, file]
    log.setLevel(logging.INFO)
    log.propagate = False
