"""Needle-in-a-haystack (DroPE paper, appendix C.2): seven-digit values (`niah.value_digits`) under two-word keys,
hidden in held-out text, retrieved by greedy decoding or scored by teacher forcing. The standard task's needle goes at
a swept depth, its score averaged over depths.

Two levels: the tasks' text (`needle_task`: needle lines, question, expected values; `prompt_text`: their layout in
prose, that of the synthetic training documents too) is data_pipelines/lookup_text.py's, which knows nothing of
tokens; `build_prompt` here encodes that text once, at an exact length, from held-out prose (`haystack_for`), so
that a needle or question gets the tokens it gets in training.

Scoring is exact match on the numbers of the values' length in the decoded output: for one expected value, the first
number of that length the model writes must be it (1 or 0); for several (multi_query, multi_value), the score is the
fraction of the expected values that appear among the numbers written (per-value recall). Teacher forcing
(`teacher_forced_scores`) scores a trial 1 when the whole answer, as a training document tokenizes it after the question
(`answer_ids`), is the model's argmax at every step: what greedy decoding would write first, in one forward pass. A
task's success rate is the mean score over its trials.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable

import numpy as np
import torch

from nopetrain.data_pipelines.lookup_text import NeedleTask, prompt_text, prose_lines
from nopetrain.model import KVCache, Transformer

# Prose gathered per haystack, in tokens of prose per token of prompt: enough that the exact-length search never
# runs out.
HAYSTACK_MARGIN = 1.2


def build_prompt(
    task: NeedleTask,
    haystack: str,
    depths: list[float],
    length: int,
    encode: Callable[[list[str]], list[list[int]]],
) -> list[int]:
    """A prompt of exactly `length` tokens, encoded as one text so that needles and question get the tokens they
    get inside a training document: the most of the haystack's last lines whose `prompt_text` fits, preceded by the
    lines before them, of which only the last tokens that complete `length` are kept (as a training sample may
    start inside a document). Depths are fractions of the lines that fit. Raises ValueError when the needles and
    question alone are too long or the haystack too short."""
    lines = haystack.split("\n")

    def body(count: int) -> str:
        return prompt_text(task, "\n".join(lines[len(lines) - count :]) if count else "", depths)

    fixed = len(encode([body(0)])[0])
    if fixed > length:
        raise ValueError(f"the needles and question take {fixed} tokens, more than the prompt's {length}")
    low, high = 0, len(lines) - 1  # at least one line is left to lead in
    while low < high:
        middle = (low + high + 1) // 2
        if len(encode([body(middle)])[0]) <= length:
            low = middle
        else:
            high = middle - 1
    ids = encode(["\n".join([*lines[: len(lines) - low], body(low)])])[0]
    if len(ids) < length:
        raise ValueError(f"the haystack ({len(lines)} lines) is too short for a prompt of {length} tokens")
    return ids[-length:]


def needle_start(prompt: list[int], needle: str, decode: Callable[[list[int]], str]) -> int:
    """The index of the prompt's token where `needle` begins: the last start whose suffix still decodes to text that
    holds the whole needle. Raises ValueError when the prompt does not hold it."""
    if needle not in decode(prompt):
        raise ValueError(f"the prompt does not hold the needle {needle!r}")
    low, high = 0, len(prompt) - 1
    while low < high:
        middle = (low + high + 1) // 2
        if needle in decode(prompt[middle:]):
            low = middle
        else:
            high = middle - 1
    return low


@functools.cache
def _value_pattern(digits: int) -> re.Pattern[str]:
    return re.compile(rf"(?<!\d)\d{{{digits}}}(?!\d)")


def score(output: str, answers: list[str]) -> float:
    """1/0 for one expected value (the first number of its length written must be it); per-value recall for
    several."""
    found = _value_pattern(len(answers[0])).findall(output)
    if len(answers) == 1:
        return float(bool(found) and found[0] == answers[0])
    return sum(answer in found for answer in answers) / len(answers)


def answered(output: str, answers: list[str]) -> bool:
    """Whether an answer is complete: it holds as many numbers of the answers' length as `answers`, or its first
    line has ended (a number still being written is not yet one of that length)."""
    return len(_value_pattern(len(answers[0])).findall(output)) >= len(answers) or "\n" in output.lstrip()


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


def answer_ids(encode: Callable[[list[str]], list[list[int]]], question: str, answer: str) -> list[int]:
    """The tokens a model must write after `question` to answer `answer`, as a training look-up document has them
    (question and answer encoded as one text). Raises ValueError when the answer's first token merges with the
    question's last."""
    base, full = encode([question])[0], encode([f"{question} {answer}"])[0]
    if full[: len(base)] != base:
        raise ValueError(f"the answer {answer!r} changes the tokens of the question it follows")
    return full[len(base) :]


def ends_like_question(
    prompt: list[int],
    question: str,
    encode: Callable[[list[str]], list[list[int]]],
    decode: Callable[[list[int]], str],
) -> bool:
    """Whether `prompt` ends with the ids `question` has encoded alone, from its last line ("Answer:") on: then the
    ids `answer_ids` finds after the question alone continue the prompt as they continue a training look-up document
    (the question's first ids may differ: alone, nothing precedes them)."""
    alone = encode([question])[0]
    shared = 0
    while shared < min(len(prompt), len(alone)) and prompt[-1 - shared] == alone[-1 - shared]:
        shared += 1
    return "\n" + question.rsplit("\n", 1)[-1] in decode(alone[len(alone) - shared :])


@torch.no_grad()
def teacher_forced_scores(
    model: Transformer, prompts: list[list[int]], answers: list[list[int]], batch_size: int = 8
) -> list[float]:
    """1.0 for each trial whose answer tokens are all the model's argmax given the prompt and the answer tokens
    before them, i.e. exactly what greedy decoding would write first, else 0.0; one forward pass per trial instead
    of one decoding step per token (a whole-answer exact match, also for the tasks with several values). Trials of
    equal prompt and answer lengths share a batch of up to `batch_size`. Exact for methods that do not depend on the
    input's length; the length-dependent ones (logit_scale, dynamic_ntk) see L + answer - 1 tokens at every position
    where greedy decoding's first step sees L, a relative difference of (answer - 1) / L in their s."""
    device = next(model.parameters()).device
    groups: dict[tuple[int, int], list[int]] = {}
    for index, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        groups.setdefault((len(prompt), len(answer)), []).append(index)
    scores = [0.0] * len(prompts)
    for (_, answer_length), indices in groups.items():
        for start in range(0, len(indices), batch_size):
            batch = indices[start : start + batch_size]
            ids = torch.tensor([prompts[i] + answers[i][:-1] for i in batch], dtype=torch.long, device=device)
            predicted = model(ids, last=answer_length).argmax(-1)
            expected = torch.tensor([answers[i] for i in batch], dtype=torch.long, device=device)
            for index, right in zip(batch, (predicted == expected).all(1).tolist(), strict=True):
                scores[index] = float(right)
    return scores


def haystack_for(
    documents: list[np.ndarray], rng: random.Random, tokens: int, decode: Callable[[list[int]], str]
) -> str:
    """Prose for a haystack of at least `tokens` tokens: consecutive held-out documents from a random one, decoded
    (their EOS left out) and kept to `prose_lines`, one text."""
    start = rng.randrange(len(documents))
    lines: list[str] = []
    total = 0.0
    for offset in range(len(documents)):
        document = documents[(start + offset) % len(documents)]
        text = decode(document[:-1].tolist())
        kept = prose_lines(text)
        lines += kept
        # The kept lines' share of the document's tokens, estimated by characters.
        total += len(document) * sum(map(len, kept)) / max(1, len(text))
        if total >= tokens * HAYSTACK_MARGIN:
            return "\n".join(lines)
    raise ValueError(f"the held-out documents hold about {int(total)} tokens of prose, a haystack needs {tokens}")
