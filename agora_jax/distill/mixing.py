"""Who learns from what in multi-student KD (docs/method.md §1, method 2), as a pure function of dev-split
outputs: student i gets every collaborative output, half of its own single-model outputs and half of
the best student's. The best student is chosen by dev score, and all outputs come from the dev split
(never test). AGORA's group distillation data (shared memory, elite peers) is built by the strategy
that runs it, `agora_jax.strategies.agora`."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from agora_jax.records import DistillExample


def _halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of range(n) into two halves (the first gets the extra item when n is odd)."""
    order = np.random.default_rng(seed).permutation(n)
    cut = (n + 1) // 2
    return np.sort(order[:cut]), np.sort(order[cut:])


def multi_student_datasets(collaborative: Sequence[DistillExample], own: Sequence[Sequence[DistillExample]],
                           dev_scores: Sequence[float], seed: int = 0) -> list[list[DistillExample]]:
    """Training set of each student: all `collaborative` + half of `own[i]` + half of the best's.

    `own[i]` are student i's single-model outputs on the dev items (one per item, same order for every
    student); the best student has the highest `dev_scores`. The dev items are split once into two
    seeded halves: each student takes its own outputs on the first half and the best student's on
    the second, so the best student itself trains on each of its outputs exactly once.
    """
    if len(own) != len(dev_scores):
        raise ValueError(f"{len(own)} students' outputs but {len(dev_scores)} dev scores")
    sizes = {len(o) for o in own}
    if len(sizes) != 1:
        raise ValueError(f"students have outputs for different numbers of dev items: {sorted(sizes)}")
    best = int(np.argmax(dev_scores))
    first, second = _halves(sizes.pop(), seed)
    best_half = [own[best][j] for j in second]
    return [list(collaborative) + [outputs[j] for j in first] + best_half for outputs in own]
