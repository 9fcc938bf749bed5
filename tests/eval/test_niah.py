"""nopetrain/eval/niah.py: prompts at an exact length with needles at their depths, and the scoring."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch

from nopetrain.data_pipelines.lookup_text import NIAH_TASKS, needle_task
from nopetrain.eval import niah

from ..helpers import tiny_model


def char_encode(texts: list[str]) -> list[list[int]]:
    """A byte-level tokenizer, so that positions in the prompt can be checked by hand."""
    return [list(text.encode()) for text in texts]


def test_build_prompt_puts_needles_at_their_depths_and_has_the_exact_length():
    text = needle_task(random.Random(1), "multi_key", 4)
    haystack = "\n".join(f"line {i:02d} of the haystack goes on here." for i in range(40))
    depths = [0.0, 0.25, 0.6, 1.0]
    prompt = niah.build_prompt(text, haystack, depths, 900, char_encode)
    assert len(prompt) == 900
    decoded = bytes(prompt).decode()
    assert decoded.endswith("\n" + text.needles[-1] + "\n" + text.question)  # depth 1: right before the question
    lines = decoded.split("\n")
    # Each needle is a line of its own after round(depth * n) of the n haystack lines that follow the depth-0 one;
    # the lines before that lead in, the first of them cut to the exact length.
    first = lines.index(text.needles[0])
    body = [line for line in lines[first:] if line.startswith("line ")]
    before = [sum(line.startswith("line ") for line in lines[first : lines.index(needle)]) for needle in text.needles]
    assert before == [round(d * len(body)) for d in depths]
    assert first > 0 and not lines[0].startswith("line ") and lines[0].endswith("haystack goes on here.")
    with pytest.raises(ValueError, match="more than the prompt's 100"):
        niah.build_prompt(text, haystack, depths, 100, char_encode)
    with pytest.raises(ValueError, match="too short for a prompt of 9000"):
        niah.build_prompt(text, haystack, depths, 9000, char_encode)


def test_needle_start_is_the_token_where_the_needle_begins():
    text = needle_task(random.Random(2), "standard")
    haystack = "\n".join(f"line {i:02d} of the haystack goes on here." for i in range(40))
    prompt = niah.build_prompt(text, haystack, [0.5], 700, char_encode)
    decoded = bytes(prompt).decode()
    assert niah.needle_start(prompt, text.needles[0], lambda ids: bytes(ids).decode()) == decoded.index(text.needles[0])
    with pytest.raises(ValueError, match="does not hold the needle 'key: absent'"):
        niah.needle_start(prompt, "key: absent", lambda ids: bytes(ids).decode())


def test_haystacks_are_prose_without_lookup_lines():
    lines = ["Some prose here.", "key: calm river, value: 1234567", "Question: what?", "More prose.", "Answer: 7"]
    documents = [np.array([*map(ord, "\n".join(lines)), 0])]
    haystack = niah.haystack_for(documents, random.Random(0), 5, lambda ids: bytes(ids).decode())
    assert haystack == "Some prose here.\nMore prose."
    with pytest.raises(ValueError, match="a haystack needs 500"):
        niah.haystack_for(documents, random.Random(0), 500, lambda ids: bytes(ids).decode())


def test_teacher_forced_scoring_agrees_with_greedy_decoding():
    """A trial scores 1 exactly when greedy decoding writes its answer tokens first, whether it shares a batch with
    trials of other answer lengths or not."""
    model = tiny_model()
    prompts = [
        [int(t) for t in torch.randint(3, 64, (12,), generator=torch.Generator().manual_seed(s))] for s in range(5)
    ]
    written = niah.generate_greedy(model, prompts, max_new_tokens=3, eos_id=-1)
    assert niah.teacher_forced_scores(model, prompts[:2], written[:2]) == [1.0, 1.0]
    other = [*written[1][:-1], (written[1][-1] + 1) % 64]
    assert niah.teacher_forced_scores(model, prompts[:2], [written[0], other]) == [1.0, 0.0]
    answers = [written[0], other, written[2][:1], [(written[3][0] + 1) % 64], written[4][:2]]
    expected = [1.0, 0.0, 1.0, 0.0, 1.0]
    for batch_size in (1, 2, 8):
        assert niah.teacher_forced_scores(model, prompts, answers, batch_size) == expected


def test_answer_ids_are_the_tokens_after_the_question():
    question, answer = "Question: what is the value of the key calm river?\nAnswer:", "1234567"
    ids = niah.answer_ids(char_encode, question, answer)
    assert bytes(ids).decode() == " 1234567"

    def decode(ids: list[int]) -> str:
        return bytes(ids).decode()

    prompt = char_encode([f"some haystack\n{question}"])[0]
    assert niah.ends_like_question(prompt, question, char_encode, decode)
    assert not niah.ends_like_question([*prompt[:-1], ord(";")], question, char_encode, decode)
    # The question's first line may tokenize differently in context; its last line ("Answer:") may not.
    assert niah.ends_like_question(prompt[:-25] + char_encode(["\nAnswer:"])[0], question, char_encode, decode)
    assert not niah.ends_like_question(char_encode(["x Answer:"])[0], question, char_encode, decode)


def test_scoring_is_exact_match_on_seven_digit_values():
    assert niah.score(" 1234567\n", ["1234567"]) == 1.0
    assert niah.score(" 12345678", ["1234567"]) == 0.0  # eight digits are not the value
    assert niah.score(" 7654321, 1234567", ["1234567"]) == 0.0  # the first number written counts
    assert niah.score("", ["1234567"]) == 0.0
    assert niah.score(" 1111111, 3333333", ["1111111", "2222222"]) == 0.5
    assert niah.score(" 2222222 and 1111111", ["1111111", "2222222"]) == 1.0
    asked = ["7654321"]
    assert niah.answered(" 1234567", asked) and not niah.answered(" 12345", asked)
    assert niah.answered(" no\n", ["1234567", "7654321"])


def test_values_of_another_length_are_drawn_scored_and_complete_at_that_length():
    for task in NIAH_TASKS:
        text = needle_task(random.Random(3), task, 4, value_digits=3)
        assert all(len(value) == 3 and value.isdigit() for value in text.answers)
        assert all(re.fullmatch(r"key: .+, value: \d{3}", needle) for needle in text.needles)
    assert niah.score(" 123\n", ["123"]) == 1.0 and niah.score(" 1234", ["123"]) == 0.0
    assert not niah.answered(" 12", ["123"]) and niah.answered(" 123", ["123"])
