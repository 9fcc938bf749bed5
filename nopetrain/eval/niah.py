"""Needle-in-a-haystack (DroPE paper, appendix C.2): seven-digit values under two-word keys, hidden in held-out
text, retrieved by greedy decoding.

Tasks: `standard` (one needle at a swept depth, the score averaged over depths), `multi_key` (four needles with
distinct keys, one asked), `multi_query` (four needles, two keys asked, values answered in the order asked) and
`multi_value` (four values under one key, all asked). The needle lines and questions follow the default corpus's
look-up format (data_pipelines/corpus_math.py), which a model trained on it has seen at short lengths.

Two levels: `needle_task` draws the text of a task (needle lines, question, expected values) from an rng and knows
nothing of tokens, so synthetic training documents can be written with it; `build_prompt` assembles a token prompt
of an exact length from held-out text and a task's text.

Scoring is exact match on the seven-digit numbers in the decoded output: for one expected value, the first number
the model writes must be it (1 or 0); for several (multi_query, multi_value), the score is the fraction of the
expected values that appear among the numbers written (per-value recall). A task's success rate is the mean score
over its trials.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from nopetrain.data_pipelines.corpus_math import lookup_keys, lookup_line, lookup_question, lookup_value
from nopetrain.model import KVCache, Transformer

MULTI_QUERY_KEYS = 2
_VALUE = re.compile(r"(?<!\d)\d{7}(?!\d)")


@dataclass
class NeedleTask:
    task: str
    needles: list[str]  # the lines to hide, in the order they appear in the haystack
    question: str  # ends with "Answer:"
    answers: list[str]  # the expected values, in the order the answer should give them

    @property
    def answer_text(self) -> str:
        return ", ".join(self.answers)


def needle_task(rng: random.Random, task: str, num_needles: int = 4) -> NeedleTask:
    """The text of one trial of `task` (standard, multi_key, multi_query, multi_value)."""
    if task == "standard":
        key, value = lookup_keys(rng, 1)[0], lookup_value(rng)
        return NeedleTask(task, [lookup_line(key, value)], lookup_question(key), [value])
    if task == "multi_value":
        key = lookup_keys(rng, 1)[0]
        values = [lookup_value(rng) for _ in range(num_needles)]
        question = f'Question: what are all the values of the key "{key}"?\nAnswer:'
        return NeedleTask(task, [lookup_line(key, value) for value in values], question, values)
    keys = lookup_keys(rng, num_needles)
    values = [lookup_value(rng) for _ in keys]
    needles = [lookup_line(key, value) for key, value in zip(keys, values, strict=True)]
    if task == "multi_key":
        asked = rng.randrange(num_needles)
        return NeedleTask(task, needles, lookup_question(keys[asked]), [values[asked]])
    if task == "multi_query":
        asked = rng.sample(range(num_needles), min(MULTI_QUERY_KEYS, num_needles))
        names = " and ".join(f'"{keys[i]}"' for i in asked)
        question = f"Question: what are the values of the keys {names}?\nAnswer:"
        return NeedleTask(task, needles, question, [values[i] for i in asked])
    raise ValueError(f"unknown NIAH task {task!r}")


def build_prompt(
    task: NeedleTask,
    haystack: np.ndarray,
    depths: list[float],
    length: int,
    encode: Callable[[list[str]], list[list[int]]],
) -> list[int]:
    """A prompt of exactly `length` tokens: held-out `haystack` tokens with the task's needles (one line each)
    inserted at fractions `depths` of the haystack (one per needle), then the question. Raises ValueError when the
    needles and question do not fit or the haystack is too short."""
    pieces = encode([f"\n{needle}\n" for needle in task.needles] + [f"\n{task.question}"])
    needles, question = pieces[:-1], pieces[-1]
    budget = length - len(question) - sum(map(len, needles))
    if budget < 0:
        raise ValueError(f"the needles and question take {length - budget} tokens, more than the prompt's {length}")
    if len(haystack) < budget:
        raise ValueError(f"the haystack has {len(haystack)} tokens, the prompt needs {budget}")
    text = haystack[:budget].tolist()
    prompt: list[int] = []
    cut = 0
    for depth, needle in sorted(zip(depths, needles, strict=True), key=lambda pair: pair[0]):
        where = round(depth * budget)
        prompt += text[cut:where] + needle
        cut = where
    return prompt + text[cut:] + question


def score(output: str, answers: list[str]) -> float:
    """1/0 for one expected value (the first seven-digit number written must be it); per-value recall for several."""
    found = _VALUE.findall(output)
    if len(answers) == 1:
        return float(bool(found) and found[0] == answers[0])
    return sum(answer in found for answer in answers) / len(answers)


def answered(output: str, count: int) -> bool:
    """Whether an answer is complete: it holds `count` seven-digit numbers, or its first line has ended."""
    return len(_VALUE.findall(output)) >= count or "\n" in output.lstrip()


@torch.no_grad()
def generate_greedy(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_id: int,
    finished: Callable[[int, list[int]], bool] | None = None,
) -> list[list[int]]:
    """Greedy continuations of equal-length prompts (one pass over the prompts, then one token at a time through a
    KV cache), cut at the first EOS. Decoding stops early once every row has an EOS or `finished(row, tokens so
    far)` holds."""
    device = next(model.parameters()).device
    ids = torch.tensor(prompts, dtype=torch.long, device=device)
    start = ids.shape[1]
    cache = KVCache(len(model.layers))
    fed = ids
    for _ in range(max_new_tokens):
        token = model(fed, cache=cache)[:, -1].argmax(-1)
        fed = token[:, None]
        ids = torch.cat([ids, fed], dim=1)
        outputs = [row[: row.index(eos_id)] if eos_id in row else row for row in ids[:, start:].tolist()]
        if all(len(o) < ids.shape[1] - start or (finished and finished(i, o)) for i, o in enumerate(outputs)):
            break
    return outputs


def haystack_for(documents: list[np.ndarray], rng: random.Random, tokens: int) -> np.ndarray:
    """`tokens` of held-out text from consecutive documents starting at a random one (their EOS left out, so the
    model reads one stream of text)."""
    start = rng.randrange(len(documents))
    parts, total = [], 0
    for offset in range(len(documents)):
        document = documents[(start + offset) % len(documents)][:-1]
        parts.append(document)
        total += len(document)
        if total >= tokens:
            return np.concatenate(parts)[:tokens]
    raise ValueError(f"the held-out documents hold {total} tokens, a haystack needs {tokens}")
