"""Final answers: extraction and normalisation for voting, and the votes over them."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from agora_jax.tasks import Example, extract_answer, normalize_math
from agora_jax.tasks.grade import normalize_text
from agora_jax.tasks.numeric import format_number, parse_number


def majority_vote(answers: list[str | None], key: Callable[[str], str] = str.strip) -> tuple[int | None, str | None]:
    """Most common extracted answer. Ties go to the answer seen first (lowest agent index);
    None (no extractable answer) never wins. Returns (index of the first agent holding it, answer):
    `weighted_vote` with every weight 1."""
    return weighted_vote(answers, [0.0] * len(answers), key)


def weighted_vote(answers: list[str | None], log_weights: Sequence[float],
                  key: Callable[[str], str] = str.strip,
                  holder_scores: Sequence[float] | None = None) -> tuple[int | None, str | None]:
    """The extracted answer with the largest summed weight, weights given as logs (summed in log space,
    so sequence probabilities of long replies do not underflow). Ties go to the answer seen first; None
    never wins. Returns (index of the answer's holder of largest `holder_scores` (default: the weights;
    ties: the earliest), answer)."""
    if len(answers) != len(log_weights):
        raise ValueError(f"{len(answers)} answers for {len(log_weights)} weights")
    holders: dict[str, list[int]] = {}
    for i, a in enumerate(answers):
        if a is not None:
            holders.setdefault(key(a), []).append(i)
    if not holders:
        return None, None
    total = {k: float(np.logaddexp.reduce([log_weights[i] for i in idx])) for k, idx in holders.items()}
    best = max(holders, key=lambda k: (total[k], -holders[k][0]))
    scores = log_weights if holder_scores is None else holder_scores
    top = max(holders[best], key=lambda i: (scores[i], -i))
    return top, answers[top]


def answer_key(answer: str, answer_type: str) -> str:
    """What two extracted answers must share to count as the same vote ("2.0" == "2", case, spacing)."""
    if answer_type == "math":
        return normalize_math(answer)
    value = parse_number(answer) if answer_type == "number" else None
    return format_number(value) if value is not None else normalize_text(answer)


def extract(text: str, example: Example) -> str | None:
    """The final answer `text` states for `example`, normalised for voting (None: none found)."""
    answer = extract_answer(text, example.answer_type, example.choices)
    return None if answer is None else answer_key(answer, example.answer_type)


def vote(texts: Sequence[str], example: Example) -> tuple[int | None, str | None]:
    """Majority over the answers extracted from `texts` (`majority_vote`: ties go to the earliest).
    Returns (index of the first text holding the winning answer, that answer)."""
    return majority_vote([extract(t, example) for t in texts])


def voted_text(texts: Sequence[str], example: Example) -> str:
    """The first of `texts` holding the majority answer (the first text when none has an answer)."""
    index, _ = vote(texts, example)
    return texts[index or 0]
