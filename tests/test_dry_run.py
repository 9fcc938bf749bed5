"""dry_run=true prints a run's plan without starting anything, refuses a bad config at once in one line, and its
numbers hold against real parts: a real model's parameter count, the LR schedule, DeepSpeed's own estimators, the
tensors autograd saves, and the peak memory of a real DeepSpeed engine's training step on CPU."""

from __future__ import annotations

import dataclasses
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from deepspeed.runtime.zero.stage3 import model_to_params
from torch.profiler import ProfilerActivity, profile, record_function

from nopetrain.config import ModelConfig, TrainConfig
from nopetrain.curriculum import learning_rate, resolve
from nopetrain.data.synthetic import SyntheticStream
from nopetrain.drope import drop_rope
from nopetrain.memory import deepspeed_estimate, model_states, saved_activation_bytes
from nopetrain.metrics import flops_per_token
from nopetrain.model import Transformer, count_parameters, lm_loss
from nopetrain.parallel import DistEnv, build_engine, destroy_process_group, init_distributed
from nopetrain.plan import make_plan
from nopetrain.resume import check_resumed_config

from .helpers import REPO, composed, gpu, set_one_rank_env, subprocess_env


def dry_run(cwd, *overrides: str, python_options: tuple[str, ...] = ()) -> tuple[subprocess.CompletedProcess, float]:
    """train.py dry_run=true in `cwd`, and its wall time."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, *python_options, str(REPO / "train.py"), "dry_run=true", *overrides],
        cwd=cwd,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc, time.perf_counter() - start


def test_dry_run_prints_the_plan_and_starts_nothing(tmp_path):
    """A 1.7B model on 64 GPUs plans on a CPU machine; it reads no data (the corpus does not exist: a missing data
    path is a real start's DataError, found when the streams open) and writes nothing, not even run.dir."""
    cwd, run_dir = tmp_path / "cwd", tmp_path / "run"
    cwd.mkdir()
    proc, elapsed = dry_run(
        cwd,
        f"run.dir={run_dir}",
        "model=smollm_1p7b",
        "deepspeed=zero3",
        "plan.world_size=64",
        "data=default",
        "data.root=/nonexistent",
        "curriculum=smollm3",
        "curriculum.drope.at_phase=annealing",
        "steps=2000",
        "seq_len=2048",
        "micro_batch_size=4",
        "global_batch_size=512",
    )
    print(f"dry run of smollm_1p7b on 64 GPUs: {elapsed:.1f} s\n{proc.stdout}")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    # The count configs/model/smollm_1p7b.yaml quotes from Hugging Face.
    assert "1,711,376,384 parameters" in out
    for phase in ("1  web        1-1480", "2  math_code  1481-1800", "3  annealing  1801-2000"):
        assert phase in out
    assert "DroPE: RoPE dropped from all 24 layers before step 1801 (phase annealing)" in out
    assert "tokens: 2.1B (2,097,152,000)" in out
    assert "memory per GPU (ZeRO-3, bf16, 64 GPUs):" in out
    assert "time: " in out
    assert not run_dir.exists()
    assert list(cwd.iterdir()) == []


@pytest.mark.parametrize(
    ("overrides", "message", "before_torch"),
    [
        (["plan.world_size=16"], "global_batch_size=8 must be a multiple of micro_batch_size x world size = 128", 1),
        (["optim.lr=-1"], "optim.lr=-1.0 must be finite and >= 0", 1),
        (["plan.world_size=12"], "plan.world_size=12 must fill whole nodes of plan.gpus_per_node=8", 1),
        (["plan.gpu=T4"], "plan.gpu='T4' has no known peak", 0),
    ],
)
def test_refused_config_fails_at_once_in_one_line(tmp_path, overrides, message, before_torch):
    """Exit 2 with one line on stderr naming the key and nothing on stdout, where DeepSpeed logs as it is imported.
    What validate() refuses is refused before torch is imported (which takes seconds): about 1 s on an idle
    machine, printed; the time bound is generous for a loaded one."""
    proc, elapsed = dry_run(REPO, f"run.dir={tmp_path}/run", *overrides, python_options=("-X", "importtime"))
    print(f"dry run refused {overrides} in {elapsed:.1f} s")
    assert proc.returncode == 2
    imports = [line for line in proc.stderr.splitlines() if line.startswith("import time:")]
    [line] = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert line.startswith(f"nopetrain: error: {message}")
    assert proc.stdout == ""
    assert elapsed < 20
    if before_torch:
        assert not any(re.search(r"\|\s+torch$", line) for line in imports)


def test_plan_counts_a_real_model_and_follows_the_schedule():
    """The meta-device count equals a real model's (with the QK-norm gains built for the DroPE switch) and DeepSpeed's
    count of it; the LR at every phase boundary is the trainer's; the time is the FLOPs at the MFU."""
    cfg = composed(
        "data=default",
        "curriculum=smollm3",
        "curriculum.drope.at_phase=math_code",
        "curriculum.drope.qk_norm=qk",
        "curriculum.drope.lr=5e-4",
        "model.sliding_window=64",
        "steps=200",
        "plan.world_size=1",
    )
    plan = make_plan(cfg)
    real = Transformer(dataclasses.replace(cfg.model), extra_qk_norm="qk")
    assert plan.parameters == count_parameters(real)
    assert (plan.parameters, plan.largest_layer) == model_to_params(real)
    # The window belongs to the RoPE layers: from the DroPE switch on, every layer attends to all 256 positions.
    assert plan.phases[0].flops_per_token == flops_per_token(real.config, cfg.seq_len)
    drop_rope(real, "qk")
    assert plan.phases[1].flops_per_token == flops_per_token(real.config, cfg.seq_len) > plan.phases[0].flops_per_token
    schedule = resolve(cfg, world_size=1)
    assert [(p.phase.start, p.phase.end) for p in plan.phases] == [(0, 148), (148, 180), (180, 200)]
    for p in plan.phases:
        assert p.lr_first == learning_rate(schedule, cfg, p.phase.start)
        assert p.lr_last == learning_rate(schedule, cfg, p.phase.end - 1)
    # From the switch on, the recalibration schedule's (no warmup) instead of the main one's stable 1e-3.
    assert (plan.phases[0].lr_last, plan.phases[1].lr_first) == (1e-3, 5e-4)
    assert plan.tokens == 200 * cfg.global_batch_size * cfg.seq_len
    assert plan.seconds * plan.peak_tflops * 1e12 * cfg.plan.mfu == pytest.approx(plan.flops)


def test_plan_keys_are_no_change_to_a_resumed_run(caplog):
    """A checkpoint from before these keys existed (or from a dry run's config) resumes without a changed-config
    warning: they say how a dry run plans, not what the run is."""
    cfg = composed("data=synthetic", "plan.world_size=64", "plan.gpu=A100")
    saved = dataclasses.asdict(composed("data=synthetic"))
    del saved["plan"], saved["dry_run"]
    with caplog.at_level(logging.WARNING, logger="nopetrain"):
        check_resumed_config({"step": 5, "config": saved, "world_size": 1}, cfg, resolve(cfg, 1), Path("ckpt"))
    assert caplog.records == []


@pytest.mark.parametrize("world_size", [1, 8, 64])
@pytest.mark.parametrize(
    ("stage", "offload_optimizer", "offload_params"),
    [(2, False, False), (2, True, False), (3, False, False), (3, True, False), (3, True, True)],
)
def test_model_states_agree_with_deepspeeds_estimators(world_size, stage, offload_optimizer, offload_params):
    """bf16 model states equal DeepSpeed's estimate, but for the bf16 weights' partition its ZeRO-3 estimator leaves
    out (test_peak_memory_of_a_real_step_is_within_the_plan measures a real engine holding it)."""
    params, largest_layer = 1_711_376_384, 100_663_296
    states = model_states(params, largest_layer, stage, True, world_size, offload_optimizer, offload_params)
    gpu, _ = deepspeed_estimate(params, largest_layer, stage, world_size, 8, offload_optimizer, offload_params)
    left_out = 2 * params / world_size if stage == 3 and not offload_optimizer else 0
    ours = states.parameters + states.gradients + states.optimizer_states
    assert ours == pytest.approx(gpu + left_out, abs=4)


def saved_by_autograd(model: Transformer, input_ids: torch.Tensor, labels: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd keeps for backward in the loss's forward pass, parameters aside."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        lm_loss(model(input_ids), labels)
    return sum(size for pointer, size in storages.items() if pointer not in params)


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize(
    "shape",
    [{}, {"no_rope_layer_interval": 1}, {"qk_norm": "qk"}, {"qk_norm": "q", "num_kv_heads": 4}],
    ids=["rope", "nope", "qk_norm", "q_norm_mha"],
)
def test_activation_formula_is_what_autograd_saves(bf16, shape):
    """The CPU path (the PyTorch reference prologue) within 1%: the formula counts RoPE's tables per token rather
    than per position, and token ids and labels apart though they are slices of one tensor."""
    model = Transformer(ModelConfig(vocab_size=2048, **shape)).to(torch.bfloat16 if bf16 else torch.float32)
    tokens = torch.randint(2048, (4, 129))
    measured = saved_by_autograd(model, tokens[:, :-1], tokens[:, 1:])
    assert saved_activation_bytes(model.config, 4 * 128, bf16, fused_prologue=False) == pytest.approx(
        measured, rel=0.01
    )


@pytest.fixture(scope="module")
def process_group():
    """A gloo group of one in this process, as `python train.py` makes; the environment is restored after."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        set_one_rank_env(monkeypatch)
        env = init_distributed()
        yield env
        destroy_process_group(env)


def training_step(engine, stream: SyntheticStream, device: torch.device) -> None:
    """One optimizer step as the trainer takes it (one micro-batch)."""
    batch = stream.next_batch().to(device)
    engine.backward(lm_loss(engine(batch.input_ids, batch.position_ids, batch.segments), batch.labels))
    engine.step()


def peak_bytes_in(prof: profile, window: str) -> int:
    """The most bytes torch had allocated since profiling began, during the `window` record_function range: the
    profiler's allocation and free events summed in time order (the CPU's counterpart of CUDA's peak)."""
    events = sorted(prof.profiler.kineto_results.events(), key=lambda event: event.start_ns())
    [span] = [event for event in events if event.name() == window]
    allocated = peak = 0
    for event in events:
        if event.name() == "[memory]":
            allocated += event.nbytes()
            if span.start_ns() <= event.start_ns() <= span.end_ns():
                peak = max(peak, allocated)
    return peak


def second_step_peak(cfg: TrainConfig, env: DistEnv) -> int:
    """Peak bytes torch allocates in a real engine's second step (AdamW's moments exist from the first), counted
    from before the engine is built: CUDA's allocator peak on a GPU, the profiler's on CPU."""
    if env.device.type == "cuda":
        before = torch.cuda.memory_allocated(env.device)
        engine, stream = build_engine(cfg, env), SyntheticStream(cfg, rank=0, world_size=1)
        training_step(engine, stream, env.device)
        torch.cuda.reset_peak_memory_stats(env.device)
        training_step(engine, stream, env.device)
        return torch.cuda.max_memory_allocated(env.device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        engine, stream = build_engine(cfg, env), SyntheticStream(cfg, rank=0, world_size=1)
        training_step(engine, stream, env.device)
        with record_function("measured step"):
            training_step(engine, stream, env.device)
    return peak_bytes_in(prof, "measured step")


def small_run(*overrides: str) -> TrainConfig:
    return composed(
        "data=synthetic",
        "plan.world_size=1",
        "model.vocab_size=2048",
        "seq_len=128",
        "micro_batch_size=8",
        "global_batch_size=8",
        *overrides,
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="measures on CPU; the GPU test below measures on CUDA")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_peak_memory_of_a_real_step_is_within_the_plan(process_group, stage, precision):
    """A real DeepSpeed engine on CPU, built and stepped as the trainer does (world size 1, synthetic data): the peak
    of torch's allocations in a step lies within 2% of the plan's bounds, from the weights, optimizer states and
    activations up to everything at once.

    Torch's own allocations, not the process's peak RSS that metrics.memory_gib reports on CPU: Python, torch and
    DeepSpeed's libraries alone are hundreds of MiB, dwarfing a small model, and an allocated buffer the CPU never
    touches (DeepSpeed's reduce bucket) takes no RSS while it takes GPU memory. The bucket is made small here so that
    the model's own memory dominates; kernels=torch plans the PyTorch prologue the CPU runs."""
    cfg = small_run(f"deepspeed=zero{stage}", f"precision={precision}", "kernels=torch")
    cfg.deepspeed.extra = {"zero_optimization": {"reduce_bucket_size": 1_000_000}}
    memory = make_plan(cfg).memory
    peak = second_step_peak(cfg, process_group)
    print(f"ZeRO-{stage} {precision}: peak {peak:,} bytes, plan {memory.floor:,} to {memory.total:,}")
    assert 0.98 * memory.floor <= peak <= 1.02 * memory.total


@gpu
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_peak_gpu_memory_of_a_real_step_is_within_the_plan(process_group, stage):
    """The same on a GPU, as planned for one: bf16, the fused prologue, DeepSpeed's default reduce bucket; 5% for
    the caching allocator's rounding of each block."""
    cfg = small_run(f"deepspeed=zero{stage}", "precision=bf16")
    memory = make_plan(cfg).memory
    peak = second_step_peak(cfg, process_group)
    print(f"ZeRO-{stage} bf16 on {torch.cuda.get_device_name()}: peak {peak:,}, plan {memory.floor:,}-{memory.total:,}")
    assert 0.95 * memory.floor <= peak <= 1.05 * memory.total
