"""Synthetic arithmetic, generated from a seed, for fast CPU experiments with tiny models.

A problem is `steps` operations on integers of up to `digits` digits, with the usual precedence
(* before + and -) and no parentheses. Style "compact": question "12+7*3=", answer "33", no
instruction (the reply is just the number). Style "steps": the same question, and the reference
solution works it out in compact steps, "7*3=21,12+21=33" (the last number is the answer; tiny
models learn this far faster than the one-shot answer). Style "chat", for chat models: "What is 8 + 6?"
with the task's number instruction (a boxed answer); the reference solution works it out one operation
at a time and ends "The answer is N".
With `modulus` m > 0 every operation's result is taken mod m ("8+6+5=" -> "8+6=4,4+5=9" for m = 10):
with one-digit operands and m = 10 every step is one of a small set of facts on single digits.
With `constants` k > 0 the first operand is a letter, one of the first k of a..z, that stands for a
number fixed by the seed: the facts to know ("c=3") are separate from the arithmetic skill, so a
pool can split that knowledge between experts ("c+4-7=" -> "c=3,3+4=7,7-7=0"). A letter belongs to
expert ord(letter) mod `groups` (the pool builder's expert slicing). With `pairs` p > 0 a share p of the
problems names a second letter as the second operand ("c+x+4=" -> "c=3,x=5,3+5=8,8+4=2"): in the train
split both letters belong to one expert (each expert learns the form on its own facts), in test and dev
to two different experts, so no single expert trained alone knows both facts; the collaboration can
pass each expert's facts to the others through distillation, after which the evolved members can.
With `anywhere` the letters stand at random operand positions ("4+c+7=" -> "c=3,4+3=7,7+7=4"), so
an expert learns to recall a fact wherever it is named.
Test, dev and train are consecutive runs of distinct problems from one seeded stream, so the test
set does not change when n_dev or n_train do.
"""

from __future__ import annotations

import numpy as np

from agora_jax.tasks.task import Example, Task, build_messages

STYLES = ("compact", "steps", "chat")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
OPERATORS = tuple(_APPLY)  # what `ops` may hold
MAX_CONSTANTS = len(_LETTERS)


def reduce_once(operands: list[int], operators: list[str], modulus: int = 0) -> tuple[list[int], list[str], str]:
    """Applies the first '*' (else the leftmost operator), mod `modulus` if > 0; returns the new
    expression and the step."""
    i = operators.index("*") if "*" in operators else 0
    a, op, b = operands[i], operators[i], operands[i + 1]
    value = _APPLY[op](a, b)
    if modulus:
        value %= modulus
    step = f"{a}{op}{b}={value}"
    return operands[:i] + [value] + operands[i + 2 :], operators[:i] + operators[i + 1 :], step


def solve(operands: list[int], operators: list[str], modulus: int = 0) -> tuple[int, list[str]]:
    """Value of the expression (mod `modulus` if > 0) and the steps that compute it."""
    steps = []
    while operators:
        operands, operators, step = reduce_once(operands, operators, modulus)
        steps.append(step)
    return operands[0], steps


def _problem(rng: np.random.Generator, digits: int, steps: int, ops: str) -> tuple[list[int], list[str]]:
    operands = [int(x) for x in rng.integers(0, 10**digits, size=steps + 1)]
    operators = [ops[int(i)] for i in rng.integers(0, len(ops), size=steps)]
    return operands, operators


def _numbers(operands: list[int], values: np.ndarray, slots: tuple[int, ...] = (0,)) -> list[int]:
    """The operands as numbers: with named constants (`values` not empty) the operands at `slots` are
    letters' indices, replaced by their values."""
    if not len(values):
        return operands
    return [int(values[x]) if k in slots else x for k, x in enumerate(operands)]


def _owner(letter: int, groups: int) -> int:
    """The expert a letter belongs to: ord(letter) mod groups, as the pool builder slices by group."""
    return ord(_LETTERS[letter]) % groups


def _spaced(text: str) -> list[str]:
    """"c+4=7" -> ["c", "+", "4", "=", "7"]: the numbers, letters and operators of `text`."""
    out: list[str] = []
    for ch in text:
        if out and ch.isalnum() and out[-1][-1].isalnum():
            out[-1] += ch
        else:
            out.append(ch)
    return out


def _example(operands: list[int], operators: list[str], slots: tuple[int, ...], style: str, split: str,
             index: int, modulus: int, values: np.ndarray) -> Example:
    slots = slots if len(values) else ()
    names = [_LETTERS[x] if k in slots else x for k, x in enumerate(operands)]
    numbers = _numbers(operands, values, slots)
    recall = [f"{names[k]}={numbers[k]}" for k in slots]  # the constants' values, the first steps
    expression = "".join(f"{a}{op}" for a, op in zip(names, operators)) + str(names[-1])
    value, work = solve(numbers, operators, modulus)
    work = recall + work
    if style == "compact":
        question, instruction, solution = f"{expression}=", "", str(value)
    elif style == "steps":
        question, instruction, solution = f"{expression}=", "", ",".join(work)
    else:  # what a chat model reads: operators spaced, the task's usual number instruction
        question = f"What is {' '.join(_spaced(expression))}?"
        instruction = None
        solution = ", ".join(" ".join(_spaced(step)) for step in work) + f". The answer is {value}."
    return Example(
        id=f"synthetic/{split}/{index}",
        question=question,
        messages=build_messages(question, "number", instruction),
        answer=str(value),
        answer_type="number",
        solution=solution,
        group=str(names[slots[0]] if slots else names[0]),
    )


def synthetic_task(
    digits: int = 2,
    steps: int = 2,
    ops: str = "+-*",
    n_train: int = 2000,
    n_dev: int = 200,
    n_test: int = 200,
    seed: int = 0,
    style: str = "compact",
    nonnegative: bool = True,
    modulus: int = 0,
    constants: int = 0,
    pairs: float = 0.0,
    groups: int = 3,
    anywhere: bool = False,
    name: str = "synthetic",
) -> Task:
    """Arithmetic task with difficulty knobs `digits` (operand size) and `steps` (operations);
    `modulus` > 0 computes every step mod that number (0: ordinary integers); `constants` > 0 makes
    the first operand one of that many named constants (letters with seeded values of `digits` digits);
    `pairs` > 0 makes that share of problems name a second letter, of the same expert (of `groups`) in
    train, of another in test and dev; `anywhere` puts the letters at random operand positions."""
    if (digits < 1 or steps < 1 or not ops or set(ops) - set(_APPLY) or style not in STYLES or modulus < 0
            or not 0 <= constants <= len(_LETTERS) or not 0 <= pairs <= 1 or groups < 1
            or (pairs and (constants < 2 * groups or groups < 2))):
        raise ValueError(f"bad synthetic knobs: digits={digits} steps={steps} ops={ops!r} style={style!r} "
                         f"modulus={modulus} constants={constants} (at most {len(_LETTERS)}) pairs={pairs} "
                         f"groups={groups} (pairs need groups >= 2 and constants >= 2 x groups)")
    values = np.random.default_rng([seed, 1]).integers(0, 10**digits, size=constants)
    sizes = {"test": n_test, "dev": n_dev, "train": n_train}
    total = sum(sizes.values())
    rng = np.random.default_rng(seed)
    seen: set[tuple] = set()
    problems: list[tuple[list[int], list[str], int]] = []
    for _ in range(50 * total + 1000):
        if len(problems) == total:
            break
        operands, operators = _problem(rng, digits, steps, ops)
        slots = (0,)
        if constants:
            operands[0] = int(rng.integers(0, constants))  # the letter; its value is values[letter]
        if pairs and rng.random() < pairs:  # a second letter: the same expert's in train, another's elsewhere
            in_train = len(problems) >= n_test + n_dev
            fitting = [k for k in range(constants) if k != operands[0]
                       and (_owner(k, groups) == _owner(operands[0], groups)) == in_train]
            operands[1], slots = int(fitting[int(rng.integers(0, len(fitting)))]), (0, 1)
        if anywhere and constants:  # the letters, in order, at random operand positions
            where = tuple(sorted(int(k) for k in rng.choice(steps + 1, size=len(slots), replace=False)))
            letters, numbers = operands[:len(slots)], iter(operands[len(slots):])
            by_slot = dict(zip(where, letters))
            operands, slots = [by_slot[k] if k in by_slot else next(numbers) for k in range(steps + 1)], where
        key = (tuple(operands), tuple(operators), slots)
        if key in seen or (nonnegative and solve(_numbers(operands, values, slots), operators, modulus)[0] < 0):
            continue
        seen.add(key)
        problems.append((operands, operators, slots))
    if len(problems) < total:
        raise ValueError(f"only {len(problems)} distinct problems with digits={digits} steps={steps} "
                         f"ops={ops!r} modulus={modulus} constants={constants}; asked for {total}")
    splits, start = {}, 0
    for split, n in sizes.items():
        splits[split] = [_example(*problems[start + i], style, split, i, modulus, values) for i in range(n)]
        start += n
    return Task(name, "number", splits)
