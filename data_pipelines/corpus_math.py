"""Math for the default corpus: seeded arithmetic and algebra problems with worked solutions.

A problem document reads "Problem: ...", "Solution: ..." (the worked steps), "Result: ...". Its last line is not
"Answer:": that cue belongs to the look-up questions (data_pipelines/lookup_text.py), where the answer is copied
from the context; a computed number after the same cue competed with copying. The math source holds no look-ups: a
look-up needs its needles in the same training sample as its question, which only the look-up source (tokenized
whole) guarantees; packed math would split most of them.

Everything is drawn from the `random.Random` passed in, so a seed gives the same documents on every machine.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from fractions import Fraction


def _signed(value: int) -> str:
    """A term that follows another: "+ 5" or "- 5"."""
    return f"- {-value}" if value < 0 else f"+ {value}"


def _factor(value: int) -> str:
    """A number as a factor of a product: negative ones in brackets."""
    return f"({value})" if value < 0 else str(value)


def _polynomial(*terms: tuple[int, str]) -> str:
    """Writes terms (coefficient, variable) the way people do: no zero terms, no 1 before a variable."""
    parts: list[str] = []
    for coefficient, variable in terms:
        if coefficient == 0:
            continue
        magnitude = "" if abs(coefficient) == 1 and variable else str(abs(coefficient))
        if parts:
            parts.append(f"{'-' if coefficient < 0 else '+'} {magnitude}{variable}")
        else:
            parts.append(f"{'-' if coefficient < 0 else ''}{magnitude}{variable}")
    return " ".join(parts) or "0"


def _addition(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(10, 999_999), rng.randint(10, 99_999)
    if rng.random() < 0.5:
        return f"Compute {a} + {b}.", f"{a} + {b} = {a + b}. Check: {a + b} - {b} = {a}.", str(a + b)
    a, b = max(a, b), min(a, b)
    return f"Compute {a} - {b}.", f"{a} - {b} = {a - b}. Check: {a - b} + {b} = {a}.", str(a - b)


def _multiplication(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(12, 999), rng.randint(12, 99)
    tens, units = b - b % 10, b % 10
    steps = f"{a} * {b} = {a} * {tens} + {a} * {units} = {a * tens} + {a * units} = {a * b}."
    return f"Compute {a} * {b}.", steps, str(a * b)


def _division(rng: random.Random) -> tuple[str, str, str]:
    divisor, quotient = rng.randint(3, 99), rng.randint(10, 999)
    remainder = rng.randrange(divisor)
    n = divisor * quotient + remainder
    steps = (
        f"{divisor} * {quotient} = {divisor * quotient}, and {n} - {divisor * quotient} = {remainder}, "
        f"which is less than {divisor}. So {n} = {divisor} * {quotient} + {remainder}."
    )
    return f"Divide {n} by {divisor}.", steps, f"{quotient} remainder {remainder}"


def _order_of_operations(rng: random.Random) -> tuple[str, str, str]:
    a, b, c, d = rng.randint(1, 50), rng.randint(2, 12), rng.randint(10, 40), rng.randint(1, 9)
    inner = c - d
    steps = f"Brackets first: {c} - {d} = {inner}. Then multiplication: {b} * {inner} = {b * inner}. "
    steps += f"Then addition: {a} + {b * inner} = {a + b * inner}."
    return f"Evaluate {a} + {b} * ({c} - {d}).", steps, str(a + b * inner)


def _fractions(rng: random.Random) -> tuple[str, str, str]:
    p, q = rng.randint(2, 12), rng.randint(2, 12)
    x, y = Fraction(rng.randint(1, p - 1), p), Fraction(rng.randint(1, q - 1), q)
    common = math.lcm(x.denominator, y.denominator)
    xs, ys = x.numerator * common // x.denominator, y.numerator * common // y.denominator
    total = x + y
    steps = (
        f"The least common denominator of {x.denominator} and {y.denominator} is {common}. "
        f"{x} = {xs}/{common} and {y} = {ys}/{common}, so the sum is {xs + ys}/{common}"
    )
    steps += "." if total.denominator == common else f", which simplifies to {total}."
    return f"Compute {x} + {y}.", steps, str(total)


def _percentage(rng: random.Random) -> tuple[str, str, str]:
    percent, n = rng.randrange(5, 100, 5), rng.randint(1, 50) * 20
    steps = f"{percent}% of {n} = {percent} * {n} / 100 = {percent * n} / 100 = {percent * n // 100}."
    return f"What is {percent}% of {n}?", steps, str(percent * n // 100)


def _linear_equation(rng: random.Random) -> tuple[str, str, str]:
    a, x, b = rng.randint(2, 12), rng.randint(-20, 20), rng.choice([*range(-50, 0), *range(1, 51)])
    c = a * x + b
    move = f"Subtract {b} from" if b > 0 else f"Add {-b} to"
    steps = (
        f"{move} both sides: {a}x = {c - b}. Divide both sides by {a}: x = {x}. "
        f"Check: {a} * {_factor(x)} {_signed(b)} = {c}."
    )
    return f"Solve for x: {_polynomial((a, 'x'), (b, ''))} = {c}.", steps, f"x = {x}"


def _quadratic(rng: random.Random) -> tuple[str, str, str]:
    r1, r2 = sorted((rng.randint(-9, 9), rng.randint(-9, 9)))
    s, p = r1 + r2, r1 * r2
    equation = _polynomial((1, "x^2"), (-s, "x"), (p, ""))
    # A zero root gives the factor x, written first: x(x - 3).
    factors = "".join("x" if root == 0 else f"(x {_signed(-root)})" for root in sorted((r1, r2), key=bool))
    steps = f"We need two numbers whose sum is {s} and whose product is {p}: {r1} and {r2}. "
    steps += f"So {equation} = {factors}, which is 0 when x = {r1} or x = {r2}."
    answer = f"x = {r1}" if r1 == r2 else f"x = {r1} or x = {r2}"
    return f"Solve {equation} = 0.", steps, answer


def _gcd(rng: random.Random) -> tuple[str, str, str]:
    g = rng.randint(2, 30)
    a, b = sorted((g * rng.randint(2, 60), g * rng.randint(2, 60)), reverse=True)
    question, steps = f"Find the greatest common divisor of {a} and {b}.", ["By Euclid's algorithm:"]
    while b:
        steps.append(f"{a} = {a // b} * {b} + {a % b}.")
        a, b = b, a % b
    steps.append(f"The last non-zero remainder is {a}.")
    return question, " ".join(steps), str(a)


def _system(rng: random.Random) -> tuple[str, str, str]:
    x, y = rng.randint(-10, 10), rng.randint(-10, 10)
    a1, b1, a2, b2 = (rng.randint(1, 6) for _ in range(4))
    if a1 * b2 == a2 * b1:  # no unique solution: make the second equation independent
        b2 += 1
    c1, c2 = a1 * x + b1 * y, a2 * x + b2 * y
    first, second = _polynomial((a1, "x"), (b1, "y")), _polynomial((a2, "x"), (b2, "y"))
    question = f"Solve the system {first} = {c1} and {second} = {c2}."
    det = a1 * b2 - a2 * b1
    steps = (
        f"Multiply the first equation by {a2} and the second by {a1}, then subtract the second from the first: "
        f"({a2 * b1} - {a1 * b2})y = {a2 * c1} - {_factor(a1 * c2)}, so {_polynomial((-det, 'y'))} = "
        f"{a2 * c1 - a1 * c2} and y = {y}. Substitute into the first equation: {_polynomial((a1, 'x'))} "
        f"{_signed(b1 * y)} = {c1}, so {_polynomial((a1, 'x'))} = {c1 - b1 * y} and x = {x}."
    )
    return question, steps, f"x = {x}, y = {y}"


def _expansion(rng: random.Random) -> tuple[str, str, str]:
    a, b, c, d = rng.randint(1, 9), rng.randint(-9, 9) or 1, rng.randint(1, 9), rng.randint(-9, 9) or 1
    left, right = _polynomial((a, "x"), (b, "")), _polynomial((c, "x"), (d, ""))
    result = _polynomial((a * c, "x^2"), (a * d + b * c, "x"), (b * d, ""))
    ax, cx = _polynomial((a, "x")), _polynomial((c, "x"))
    steps = (
        f"Multiply each term: {ax} * {cx} = {a * c}x^2, {ax} * {_factor(d)} = {a * d}x, {b} * {cx} = {b * c}x, "
        f"{b} * {_factor(d)} = {b * d}. Collect the x terms: {a * d}x {_signed(b * c)}x = {a * d + b * c}x."
    )
    return f"Expand ({left})({right}).", steps, result


PROBLEMS: tuple[Callable[[random.Random], tuple[str, str, str]], ...] = (
    _addition,
    _multiplication,
    _division,
    _order_of_operations,
    _fractions,
    _percentage,
    _linear_equation,
    _quadratic,
    _gcd,
    _system,
    _expansion,
)


def problem(rng: random.Random) -> str:
    question, steps, answer = rng.choice(PROBLEMS)(rng)
    return f"Problem: {question}\nSolution: {steps}\nResult: {answer}"


def math_documents(seed: int) -> Iterator[str]:
    """An endless seeded stream of problems."""
    rng = random.Random(seed)
    while True:
        yield problem(rng)
