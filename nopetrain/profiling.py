"""Where time and memory go: a window of training steps recorded by torch's profiler (`profile.steps`, from step
`profile.start`) into run.dir/profile/, so a user whose real peak differs from the dry run's plan can look.

Per rank: `trace_rank_N.json` (Chrome trace format: open it in Perfetto or chrome://tracing; CPU and CUDA activity,
allocations and frees, shapes, Python stacks; each step a `train_step N` range), `memory_rank_N.txt` (ops sorted by
the memory they allocate), and on a GPU `memory_snapshot_rank_N.pickle`, the CUDA caching allocator's history
(every block, with the stack that allocated it: drag it into pytorch.org/memory_viz). Outside the window nothing is
recorded and the step is untouched.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

from nopetrain.config import ProfileConfig

log = logging.getLogger("nopetrain")

PROFILE_DIR = "profile"
# Allocation events the CUDA memory history keeps (the newest win); about 100 bytes each on the host.
MEMORY_HISTORY_ENTRIES = 200_000


class StepProfiler:
    def __init__(self, cfg: ProfileConfig, run_dir: Path, rank: int, device: torch.device) -> None:
        self.first, self.last = cfg.start, cfg.start + cfg.steps - 1
        self.enabled = cfg.steps > 0
        self.out = run_dir / PROFILE_DIR
        self.rank, self.cuda = rank, device.type == "cuda"
        self.profiler: profile | None = None
        self.step_range: record_function | None = None

    def start_step(self, step: int) -> None:
        """Called before step `step` (counted from 1, as the log counts) does any work."""
        if not self.enabled or not self.first <= step <= self.last:
            return
        if step == self.first:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            if self.cuda:
                torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
            self.profiler = profile(activities=activities, profile_memory=True, record_shapes=True, with_stack=True)
            self.profiler.__enter__()
        self.step_range = record_function(f"train_step {step}")
        self.step_range.__enter__()

    def end_step(self, step: int) -> None:
        """Called once step `step` has taken its optimizer step; writes the files after the window's last step."""
        if self.step_range is None:
            return
        self.step_range.__exit__(None, None, None)
        self.step_range = None
        if step == self.last:
            self._write()

    def _write(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.profiler.__exit__(None, None, None)
        self.out.mkdir(parents=True, exist_ok=True)
        trace = self.out / f"trace_rank_{self.rank}.json"
        self.profiler.export_chrome_trace(str(trace))
        sort_by = "self_cuda_memory_usage" if self.cuda else "self_cpu_memory_usage"
        table = self.profiler.key_averages().table(sort_by=sort_by, row_limit=40)
        (self.out / f"memory_rank_{self.rank}.txt").write_text(table + "\n")
        if self.cuda:
            torch.cuda.memory._dump_snapshot(str(self.out / f"memory_snapshot_rank_{self.rank}.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
        self.profiler = None
        log.info("profile of steps %d-%d written to %s", self.first, self.last, self.out)


def allocated_bytes(prof: profile, window: str | None = None) -> tuple[int, int]:
    """(most, last): the most bytes torch had allocated since `prof` began (within the `window` record_function range
    when one is named) and what it still held when `prof` ended: the profiler's allocation and free events summed in
    time order. The CPU's counterpart of CUDA's max_memory_allocated, for memory measured where there is no GPU."""
    events = sorted(prof.profiler.kineto_results.events(), key=lambda event: event.start_ns())
    start, end = 0, float("inf")
    if window is not None:
        [span] = [event for event in events if event.name() == window]
        start, end = span.start_ns(), span.end_ns()
    allocated = most = 0
    for event in events:
        if event.name() == "[memory]":
            allocated += event.nbytes()
            if start <= event.start_ns() <= end:
                most = max(most, allocated)
    return most, allocated
