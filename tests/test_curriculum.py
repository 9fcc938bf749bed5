"""Curriculum resolution (phase lengths, group weights, the DroPE step, schedules) and its errors."""

from __future__ import annotations

import math

import pytest

from nopetrain.config import ConfigError, CurriculumConfig, DropeConfig, PhaseConfig, SourceConfig, TrainConfig
from nopetrain.curriculum import learning_rate, resolve


def config(phases=(), drope=None, steps=100, sources=None, **overrides) -> TrainConfig:
    cfg = TrainConfig(steps=steps, seq_len=64, micro_batch_size=2, global_batch_size=4, **overrides)
    cfg.curriculum = CurriculumConfig(phases=list(phases), drope=drope or DropeConfig())
    cfg.data.sources = sources or {}
    return cfg


def test_lengths_in_steps_tokens_fraction_and_an_open_last_phase():
    schedule = resolve(
        config(
            [
                PhaseConfig(name="a", steps=10),
                PhaseConfig(name="b", tokens=64 * 4 * 25),
                PhaseConfig(name="c", fraction=0.5),
                PhaseConfig(name="d", seq_len=128, global_batch_size=8),
            ]
        ),
        world_size=2,
    )
    spans = [(p.name, p.start, p.end) for p in schedule.phases]
    assert spans == [("a", 0, 10), ("b", 10, 35), ("c", 35, 85), ("d", 85, 100)]
    assert schedule.phase_at(85).seq_len == 128 and schedule.phase_at(85).global_batch_size == 8
    assert schedule.phase_at(84).name == "c"


def test_group_weights_are_split_over_the_sources_of_each_group():
    sources = {
        "fineweb": SourceConfig(path="x", weight=3.0, group="web"),
        "dclm": SourceConfig(path="y", weight=1.0, group="web"),
        "stack": SourceConfig(path="z", weight=1.0, group="code"),
    }
    schedule = resolve(config([PhaseConfig(name="a", weights={"web": 0.8, "code": 0.2})], sources=sources), 1)
    assert schedule.phases[0].weights == pytest.approx({"fineweb": 0.6, "dclm": 0.2, "stack": 0.2})


def test_a_phase_can_draw_from_sources_the_datas_own_mixture_leaves_out():
    # A short-context phase's source has weight 0 in the data config (no other phase draws from it).
    sources = {
        "web": SourceConfig(path="x", weight=1.0),
        "short_a": SourceConfig(path="y", weight=0.0, group="short"),
        "short_b": SourceConfig(path="z", weight=0.0, group="short"),
    }
    phases = [PhaseConfig(name="a", steps=10, weights={"short": 1.0}), PhaseConfig(name="b")]
    schedule = resolve(config(phases, sources=sources), 1)
    assert schedule.phases[0].weights == pytest.approx({"web": 0.0, "short_a": 0.5, "short_b": 0.5})
    assert schedule.phases[1].weights == pytest.approx({"web": 1.0, "short_a": 0.0, "short_b": 0.0})


@pytest.mark.parametrize(
    ("drope", "step"),
    [
        (DropeConfig(at_step=7), 7),
        (DropeConfig(at_fraction=0.875), 88),
        (DropeConfig(at_phase="b"), 40),
        (DropeConfig(), None),
    ],
)
def test_drope_step(drope, step):
    phases = [PhaseConfig(name="a", steps=40), PhaseConfig(name="b")]
    assert resolve(config(phases, drope), 1).drope_step == step


def test_recalibration_schedule_and_wsd_decay_at_a_phase():
    drope = DropeConfig(at_step=80, lr=1e-3, warmup_fraction=0.1, min_lr_ratio=0.0)
    cfg = config([PhaseConfig(name="a", steps=60), PhaseConfig(name="anneal")], drope)
    cfg.curriculum.decay_phase = "anneal"
    cfg.schedule.name, cfg.schedule.warmup_steps, cfg.schedule.min_lr_ratio = "wsd", 10, 0.0
    cfg.optim.lr = 3e-4
    schedule = resolve(cfg, 1)
    assert schedule.decay_start == 60 and schedule.drope_warmup == 2
    assert learning_rate(schedule, cfg, 59) == pytest.approx(3e-4)
    assert learning_rate(schedule, cfg, 70) == pytest.approx(3e-4 * 30 / 40)
    assert learning_rate(schedule, cfg, 80) == pytest.approx(0.5e-3)
    assert learning_rate(schedule, cfg, 81) == pytest.approx(1e-3)
    # Cosine over the 18 steps after the warmup: step 92 is 10 of them in.
    assert learning_rate(schedule, cfg, 92) == pytest.approx(0.5e-3 * (1 + math.cos(math.pi * 10 / 18)))


@pytest.mark.parametrize(
    ("phases", "drope", "message"),
    [
        ([PhaseConfig(name="a", steps=5, fraction=0.1), PhaseConfig(name="b")], None, "phases[0] sets steps and"),
        ([PhaseConfig(name="a"), PhaseConfig(name="b")], None, "phases[0] (a) has no length"),
        ([PhaseConfig(name="a", steps=200)], None, "phases[0].steps=200 (200 steps) = 200 steps, past steps=100"),
        # Phase 0's fraction is what overshoots; every length set so far is named.
        (
            [PhaseConfig(name="a", fraction=0.95), PhaseConfig(name="b", fraction=0.16), PhaseConfig(name="c")],
            None,
            "phases[0].fraction=0.95 (95 steps) + curriculum.phases[1].fraction=0.16 (16 steps) = 111 steps, past",
        ),
        (
            [PhaseConfig(name="a", fraction=1.0), PhaseConfig(name="b")],
            None,
            "phases[0].fraction=1.0 (100 steps) = 100 steps leave none of steps=100 for the open last phase",
        ),
        ([PhaseConfig(name="a", steps=50)], None, "cover 50 steps but steps=100"),
        ([PhaseConfig(name="a", steps=50), PhaseConfig(name="a")], None, "must be unique"),
        ([PhaseConfig(name="a", global_batch_size=3)], None, "global_batch_size=3 must be a multiple"),
        ([], DropeConfig(at_step=1, at_fraction=0.5), "sets at_step and at_fraction"),
        ([], DropeConfig(at_phase="nope"), "at_phase='nope' is not a phase"),
        ([], DropeConfig(at_step=100), "drope.at_step=100 resolves to step 100, outside the run's steps"),
        ([], DropeConfig(at_fraction=1.0), "drope.at_fraction=1.0 resolves to step 100, outside the run's steps"),
        ([], DropeConfig(at_step=1, qk_norm="k"), "drope.qk_norm='k'"),
    ],
)
def test_bad_curricula_name_the_key(phases, drope, message):
    with pytest.raises(ConfigError, match="curriculum") as err:
        resolve(config(phases, drope), 1)
    assert message in str(err.value)


def test_unknown_group_and_decay_phase_without_wsd():
    sources = {"web": SourceConfig(path="x")}
    with pytest.raises(ConfigError, match="names 'maths'"):
        resolve(config([PhaseConfig(name="a", weights={"maths": 1.0})], sources=sources), 1)
    cfg = config([PhaseConfig(name="a")])
    cfg.curriculum.decay_phase = "a"
    with pytest.raises(ConfigError, match=r"needs schedule\.name=wsd"):
        resolve(cfg, 1)
