"""Scoring model replies (of one model or of a collaboration) against a task's gold answers."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from agora_jax.tasks.extract import extract_answer
from agora_jax.tasks.grade import grade
from agora_jax.tasks.task import Example, Task


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """accuracy = mean of `correct` (1/0 per item; token F1 for f1 tasks)."""

    accuracy: float
    correct: list[float]
    extracted: list[str | None]
    n_extraction_failures: int

    @property
    def n(self) -> int:
        return len(self.correct)

    def summary(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "n": self.n, "extraction_failures": self.n_extraction_failures}


def evaluate(
    predictions: Sequence[str | None], task_or_items: Task | Sequence[Example], split: str = "test"
) -> EvalResult:
    """Extracts the final answer of each reply and grades it; a reply without one scores 0 and is
    counted as an extraction failure. `split` picks the items when a Task is given."""
    items = task_or_items.split(split) if isinstance(task_or_items, Task) else list(task_or_items)
    if len(predictions) != len(items):
        raise ValueError(f"{len(predictions)} predictions for {len(items)} items")
    extracted = [extract_answer(p, e.answer_type, e.choices) for p, e in zip(predictions, items)]
    correct = [grade(a, e.answer, e.answer_type, e.choices) for a, e in zip(extracted, items)]
    return EvalResult(
        accuracy=sum(correct) / len(correct) if correct else 0.0,
        correct=correct,
        extracted=extracted,
        n_extraction_failures=sum(a is None for a in extracted),
    )
