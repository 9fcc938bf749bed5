"""nopetrain/eval/models.py: what a model spec loads."""

from __future__ import annotations

from nopetrain.eval import models


def test_the_trained_context_is_the_length_the_run_ended_at():
    short_first = {"seq_len": 128, "curriculum": {"phases": [{"name": "short", "seq_len": 64}, {"name": "main"}]}}
    assert models.trained_context(short_first) == 128
    long_last = {"seq_len": 128, "curriculum": {"phases": [{"name": "main"}, {"name": "long", "seq_len": 512}]}}
    assert models.trained_context(long_last) == 512
    assert models.trained_context({"seq_len": 256, "curriculum": {"phases": []}}) == 256
