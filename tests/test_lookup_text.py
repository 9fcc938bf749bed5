"""data_pipelines/lookup_text.py: the look-up text of the four needle-in-a-haystack tasks."""

from __future__ import annotations

import random
import re

import pytest

from nopetrain.data_pipelines.lookup_text import needle_task


@pytest.mark.parametrize(
    ("task", "needles", "answers"),
    [("standard", 1, 1), ("multi_key", 4, 1), ("multi_query", 4, 2), ("multi_value", 4, 4)],
)
def test_needle_task_text(task, needles, answers):
    text = needle_task(random.Random(5), task, 4)
    assert text == needle_task(random.Random(5), task, 4)  # same seed, same task
    assert len(text.needles) == needles and len(text.answers) == answers
    assert text.question.startswith("Question: ") and text.question.endswith("\nAnswer:")
    for answer in text.answers:
        assert len(answer) == 7 and answer.isdigit()
        line = next(line for line in text.needles if line.endswith(f", value: {answer}"))
        key = line.removeprefix("key: ").split(",")[0]
        # Unquoted, after a space, as in the needle line (so its words tokenize alike in both).
        assert len(key.split()) == 2 and re.search(rf" {key}( and|\?)", text.question)
    assert sorted(answer for i in text.asked for answer in text.answers if text.needles[i].endswith(answer)) == sorted(
        text.answers
    )  # the asked needles hold the expected values
    if task == "multi_value":
        assert len({line.split(",")[0] for line in text.needles}) == 1
    else:
        assert len({line.split(",")[0] for line in text.needles}) == needles
