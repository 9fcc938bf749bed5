"""The look-up text, shared by the synthetic look-up documents that teach retrieval (corpus_lookup.py) and the
long-context evaluation that measures it (nopetrain/eval/niah.py): two-word keys, seven-digit values, needle lines,
questions, the four needle-in-a-haystack tasks and their prose layout. Text only, no tokens and no torch, so that
`nopetrain-data` stays a light command:

    key: amber falcon, value: 4829301
    Question: what is the value of the key amber falcon?
    Answer: 4829301

Tasks (DroPE paper, appendix C.2): `standard` (one needle), `multi_key` (four needles with distinct keys, one asked),
`multi_query` (four needles, two keys asked, values answered in the order asked) and `multi_value` (four values
under one key, all asked). Everything is drawn from the `random.Random` passed in.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

NIAH_TASKS = ("standard", "multi_key", "multi_query", "multi_value")
MULTI_QUERY_KEYS = 2

ADJECTIVES = (
    "amber", "ancient", "bitter", "bold", "brave", "bright", "broken", "calm", "clever", "cold", "copper", "crimson",
    "dark", "distant", "dusty", "eager", "early", "faint", "fierce", "frozen", "gentle", "golden", "green", "hidden",
    "hollow", "humble", "icy", "idle", "iron", "jolly", "late", "lazy", "little", "lonely", "loud", "lucky", "marble",
    "misty", "narrow", "noble", "old", "pale", "proud", "purple", "quiet", "rapid", "rough", "round", "rusty",
    "sacred", "scarlet", "shy", "silent", "silver", "sleepy", "slow", "smooth", "soft", "stone", "sunny", "swift",
    "tall", "tiny", "velvet", "warm", "wild", "wise", "wooden", "young",
)  # fmt: skip
NOUNS = (
    "anchor", "apple", "arrow", "badger", "banner", "beacon", "bell", "bridge", "brook", "candle", "canyon", "castle",
    "cedar", "cloud", "comet", "compass", "crane", "crown", "desert", "dragon", "eagle", "ember", "falcon", "feather",
    "forest", "fountain", "garden", "glacier", "harbor", "hawk", "island", "lantern", "maple", "meadow", "mirror",
    "monk", "moon", "mountain", "oak", "ocean", "otter", "owl", "palace", "pebble", "pine", "planet", "quarry",
    "raven", "river", "saddle", "shadow", "ship", "sparrow", "spring", "star", "storm", "sun", "temple", "thunder",
    "tiger", "tower", "valley", "violin", "whale", "willow", "wind", "wolf",
)  # fmt: skip


def lookup_keys(rng: random.Random, count: int) -> list[str]:
    """`count` distinct two-word keys."""
    codes = rng.sample(range(len(ADJECTIVES) * len(NOUNS)), count)
    return [f"{ADJECTIVES[code // len(NOUNS)]} {NOUNS[code % len(NOUNS)]}" for code in codes]


def lookup_value(rng: random.Random, digits: int = 7) -> str:
    """A value of `digits` digits (the paper's magic numbers have seven)."""
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def lookup_line(key: str, value: str) -> str:
    return f"key: {key}, value: {value}"


def lookup_question(key: str) -> str:
    # The key unquoted, as in the needle line: a quote before it would tokenize its first word differently.
    return f"Question: what is the value of the key {key}?\nAnswer:"


@dataclass
class NeedleTask:
    task: str
    needles: list[str]  # the lines to hide, in the order they appear in the haystack
    question: str  # ends with "Answer:"
    answers: list[str]  # the expected values, in the order the answer should give them
    asked: list[int]  # the needles (indices) that hold the expected values

    @property
    def answer_text(self) -> str:
        return ", ".join(self.answers)


def needle_task(rng: random.Random, task: str, num_needles: int = 4, value_digits: int = 7) -> NeedleTask:
    """The text of one trial of `task` (standard, multi_key, multi_query, multi_value), its values of `value_digits`
    digits."""
    if task == "standard":
        key, value = lookup_keys(rng, 1)[0], lookup_value(rng, value_digits)
        return NeedleTask(task, [lookup_line(key, value)], lookup_question(key), [value], [0])
    if task == "multi_value":
        key = lookup_keys(rng, 1)[0]
        values = [lookup_value(rng, value_digits) for _ in range(num_needles)]
        question = f"Question: what are all the values of the key {key}?\nAnswer:"
        needles = [lookup_line(key, value) for value in values]
        return NeedleTask(task, needles, question, values, list(range(num_needles)))
    keys = lookup_keys(rng, num_needles)
    values = [lookup_value(rng, value_digits) for _ in keys]
    needles = [lookup_line(key, value) for key, value in zip(keys, values, strict=True)]
    if task == "multi_key":
        asked = rng.randrange(num_needles)
        return NeedleTask(task, needles, lookup_question(keys[asked]), [values[asked]], [asked])
    if task == "multi_query":
        asked = rng.sample(range(num_needles), min(MULTI_QUERY_KEYS, num_needles))
        names = " and ".join(keys[i] for i in asked)
        question = f"Question: what are the values of the keys {names}?\nAnswer:"
        return NeedleTask(task, needles, question, [values[i] for i in asked], asked)
    raise ValueError(f"unknown NIAH task {task!r}")


def prompt_text(task: NeedleTask, haystack: str, depths: list[float]) -> str:
    """The haystack's lines with the task's needles as lines of their own, the needle of depth d after
    round(d * lines) of them, then the question: the layout of a training look-up document
    (data_pipelines/corpus_lookup.py)."""
    lines = haystack.split("\n") if haystack else []
    after: dict[int, list[str]] = {}
    for depth, needle in sorted(zip(depths, task.needles, strict=True), key=lambda pair: pair[0]):
        after.setdefault(round(depth * len(lines)), []).append(needle)
    pieces = list(after.get(0, []))
    for index, line in enumerate(lines, start=1):
        pieces += [line, *after.get(index, [])]
    return "\n".join([*pieces, task.question])


# Lines in the needles' or the question's format: a haystack (or training filler) holding them would plant
# distractors.
LOOKUP_LIKE = re.compile(r"\bkey: .*\bvalue: |Question:|Answer:")


def prose_lines(text: str) -> list[str]:
    """The non-empty lines of `text` that are not in the look-up format."""
    return [line for line in text.split("\n") if line.strip() and not LOOKUP_LIKE.search(line)]
