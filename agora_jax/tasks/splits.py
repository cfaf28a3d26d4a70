"""Deterministic dev/test splits (by seed) and the check that they never share a question."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")


class SplitOverlapError(ValueError):
    """Dev (or train) and test share a question."""


def question_key(question: str) -> str:
    """Questions that differ only in case or whitespace are the same question."""
    return " ".join(question.lower().split())


def carve(
    pool: Sequence[T], n: int, seed: int, key: Callable[[T], str]
) -> tuple[list[T], list[T]]:
    """Splits `pool` into (`n` items chosen by `seed`, the rest), both in pool order.

    Items with the same key (duplicate questions) always land on the same side, so the two parts
    are disjoint by question; the first part may exceed `n` by the size of its last group.
    """
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(pool):
        groups.setdefault(key(item), []).append(i)
    order = np.random.default_rng([seed, 0]).permutation(len(groups))
    ordered = list(groups.values())
    chosen: set[int] = set()
    for g in order:
        if len(chosen) >= n:
            break
        chosen.update(ordered[g])
    return ([x for i, x in enumerate(pool) if i in chosen],
            [x for i, x in enumerate(pool) if i not in chosen])


def subsample(pool: Sequence[T], n: int | None, seed: int) -> list[T]:
    """`n` items of `pool` chosen by `seed`, in pool order (all of it when n is None or too large)."""
    if n is None or n >= len(pool):
        return list(pool)
    keep = set(np.random.default_rng([seed, 1]).choice(len(pool), size=n, replace=False).tolist())
    return [x for i, x in enumerate(pool) if i in keep]


def check_disjoint(task: str, questions: Mapping[str, Sequence[str]], against: str = "test") -> None:
    """Raises SplitOverlapError when any split shares a (normalised) question with `against`."""
    reference = {question_key(q) for q in questions[against]}
    for split, qs in questions.items():
        if split == against:
            continue
        shared = [q for q in qs if question_key(q) in reference]
        if shared:
            raise SplitOverlapError(
                f"task {task}: {split} and {against} share {len(shared)} question(s), "
                f"e.g. {shared[0][:200]!r}"
            )
