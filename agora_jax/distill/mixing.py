"""Who learns from what: per-student training sets, as pure functions of dev-split outputs.

- `multi_student_datasets` (METHOD.md §1, method 2): student i gets every collaborative output, half
  of its own single-model outputs and half of the best student's. The best student is chosen by dev
  score, and all outputs come from the dev split (never test).
- `agora_datasets` (METHOD.md §2, group distillation): each agent learns from the validated shared
  memory, mostly from its peers' solutions; in elite mode from (or weighted toward) the top-k agents
  by peer-validated accuracy. `plateaued` says when to switch elite mode on.
"""

from __future__ import annotations

import dataclasses
from typing import Hashable, Literal, Mapping, Sequence

import numpy as np

from agora_jax.distill.data import Example

Agent = Hashable


def _halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of range(n) into two halves (the first gets the extra item when n is odd)."""
    order = np.random.default_rng(seed).permutation(n)
    cut = (n + 1) // 2
    return np.sort(order[:cut]), np.sort(order[cut:])


def multi_student_datasets(collaborative: Sequence[Example], own: Sequence[Sequence[Example]],
                           dev_scores: Sequence[float], seed: int = 0) -> list[list[Example]]:
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


@dataclasses.dataclass(frozen=True)
class MemoryEntry:
    """A solution in AGORA's shared memory, with the score its peer validation gave it (0..1)."""

    problem: str | Sequence[dict[str, str]]
    solution: str
    author: Agent
    score: float


@dataclasses.dataclass(frozen=True)
class AgoraConfig:
    """Group distillation data. `elite_k=None` turns elite-peer learning off."""

    threshold: float = 0.5  # minimum validation score of a memory entry
    own_fallback: bool = True  # also learn own solutions of problems no peer solved
    elite_k: int | None = None  # top-k agents (by peer-validated accuracy) that elite mode learns from
    elite_mode: Literal["draw", "weight"] = "draw"  # only elite peers' solutions, or all with elite ones up-weighted
    elite_weight: float = 2.0  # loss weight of an elite peer's solution in "weight" mode


def _problem_key(problem: str | Sequence[dict[str, str]]) -> str:
    return problem if isinstance(problem, str) else repr([sorted(m.items()) for m in problem])


def validated(memory: Sequence[MemoryEntry], threshold: float) -> list[MemoryEntry]:
    """Entries at or above `threshold`, one per (problem, solution text), keeping the best score."""
    best: dict[tuple[str, str], MemoryEntry] = {}
    for entry in memory:
        if entry.score < threshold:
            continue
        key = (_problem_key(entry.problem), entry.solution.strip())
        if key not in best or entry.score > best[key].score:
            best[key] = entry
    return list(best.values())


def elite_agents(accuracy: Mapping[Agent, float], k: int, exclude: Agent | None = None) -> set[Agent]:
    """The k agents with the highest peer-validated accuracy, `exclude` left out (ties: given order)."""
    ranked = sorted((a for a in accuracy if a != exclude), key=lambda a: -accuracy[a])
    return set(ranked[:k])


def agora_datasets(memory: Sequence[MemoryEntry], accuracy: Mapping[Agent, float],
                   cfg: AgoraConfig = AgoraConfig()) -> dict[Agent, list[Example]]:
    """Each agent's training set from the shared memory (agents are the keys of `accuracy`).

    Agent a learns every validated peer solution; with `own_fallback`, also its own validated
    solutions of problems for which no peer solution was validated. Elite mode ("draw") keeps only
    solutions by the top-`elite_k` peers of a; ("weight") keeps all and weighs those `elite_weight`.
    """
    entries = validated(memory, cfg.threshold)
    draw = bool(cfg.elite_k) and cfg.elite_mode == "draw"
    weigh = bool(cfg.elite_k) and cfg.elite_mode == "weight"
    datasets: dict[Agent, list[Example]] = {}
    for agent in accuracy:
        elite = elite_agents(accuracy, cfg.elite_k, exclude=agent) if cfg.elite_k else set()
        chosen = [e for e in entries if e.author != agent and (not draw or e.author in elite)]
        if cfg.own_fallback:
            covered = {_problem_key(e.problem) for e in chosen}
            chosen += [e for e in entries if e.author == agent and _problem_key(e.problem) not in covered]
        datasets[agent] = [Example(e.problem, e.solution, cfg.elite_weight if weigh and e.author in elite else 1.0)
                           for e in chosen]
    return datasets

def plateaued(scores: Sequence[float], patience: int) -> bool:
    """True when the last `patience` group dev scores did not beat the best score before them."""
    if len(scores) <= patience:
        return False
    return max(scores[-patience:]) <= max(scores[:-patience])
