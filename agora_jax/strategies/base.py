"""The one interface every collaboration strategy implements, and the records it produces.

    strategy = make_strategy(config.strategy, workdir)       # registry lookup by config.name
    result = strategy.run(pool, task, "dev", rng)             # one batched engine call per round
    result.answers[i]          # final output text for task.split("dev")[i] (graded by the task)
    result.transcript          # every message: model, round, role, prompt, output, tokens, logprobs
    result.examples            # distillation data the strategy proposes (docs/method.md §1)

Anything a strategy fits (router, GNN, merge weights) is fit on the dev split only and cached under
`workdir/strategy/<name>/gen<generation>/`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Any, Callable, ClassVar, Iterable, Sequence

import jax
import ml_collections

from agora_jax.atomic import atomic_path, atomic_write_text
from agora_jax.pool import Pool
from agora_jax.records import DistillExample, Result, Turn
from agora_jax.tasks import Example, Task


def merged_config(defaults: Callable[[], ml_collections.ConfigDict],
                  config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`defaults()` recursively updated with `config` (so a config may give only what it changes)."""
    merged = defaults()
    merged.update(config)
    return merged


class Strategy:
    """Base class: subclasses set `name` and `defaults` (their module's settings function), read their
    settings from `self.config` (`defaults()` updated with the given config) and implement `run`."""

    name: ClassVar[str] = ""
    defaults: ClassVar[Callable[[], ml_collections.ConfigDict]]

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | os.PathLike | None = None):
        self.config = merged_config(type(self).defaults, config)
        self.workdir = pathlib.Path(workdir) if workdir is not None else None

    def run(self, pool: Pool, task: Task, split: str, rng: jax.Array) -> Result:
        raise NotImplementedError

    def cache_dir(self, generation: int) -> pathlib.Path | None:
        """Where fitted artifacts of this generation live (None: no workdir, nothing cached)."""
        if self.workdir is None:
            return None
        path = self.workdir / "strategy" / self.name / f"gen{generation}"
        path.mkdir(parents=True, exist_ok=True)
        return path


def final_result(items: Sequence[Example], answers: Sequence[str], transcript: list[Turn],
                 info: dict[str, Any] | None = None, source: str = "collaboration",
                 teachers: Sequence[str | None] | str | None = None) -> Result:
    """The final answer per item, each also a distillation example: (question, that answer).
    `teachers`: the logit-KD teacher of each example (one for all; None: the fused pool)."""
    if teachers is None or isinstance(teachers, str):
        teachers = [teachers] * len(items)
    examples = [DistillExample(it.id, list(it.messages), a, source=source, teacher=t)
                for it, a, t in zip(items, answers, teachers)]
    return Result(list(answers), transcript, examples, info or {})


def single_answer_result(name: str, items: Sequence[Example], finals: Sequence[Turn], transcript: list[Turn],
                         info: dict[str, Any], fused: bool = False) -> Result:
    """Final answer k = `finals[k].output` (one model's or one fused output per item). Its logit-KD
    teacher is the model that wrote it (`finals[k].model`), or with `fused` (decoded from the pool's
    fused logits) the fused pool."""
    teachers = None if fused else [t.model for t in finals]
    return final_result(items, [t.output for t in finals], transcript, info, source=name, teachers=teachers)


def fingerprint(config: ml_collections.ConfigDict, task: Task, items: Sequence[Example], pool: Pool) -> str:
    """Identifies what a cached fit depends on: settings, task, fit items, and the members with their
    current weights (`Pool.weights_digest`), so a fit made before a distillation is never reused
    after it (docs/method.md §1)."""
    blob = json.dumps([config.to_dict(), task.name, [e.id for e in items], pool.names, pool.weights_digest()],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def write_json(path: pathlib.Path, obj: Any) -> None:
    """Written to a temporary file and renamed (a reader never sees half a file)."""
    atomic_write_text(path, json.dumps(obj, indent=1))


STRATEGIES: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make a strategy available to `make_strategy` under `cls.name`."""
    if not cls.name or cls.name in STRATEGIES:
        raise ValueError(f"strategy name {cls.name!r} is empty or already registered")
    if not callable(getattr(cls, "defaults", None)):
        raise TypeError(f"strategy {cls.name!r} has no `defaults`")
    STRATEGIES[cls.name] = cls
    return cls


def make_strategy(config: ml_collections.ConfigDict, workdir: str | os.PathLike | None = None) -> Strategy:
    if config.name not in STRATEGIES:
        raise ValueError(f"config.strategy.name={config.name!r} is unknown; known: {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[config.name](config, workdir)


def write_transcript(turns: Iterable[Turn], path: str | os.PathLike) -> None:
    """JSONL, one line per message; written to a temporary file and renamed."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for turn in turns:
            f.write(json.dumps(dataclasses.asdict(turn)) + "\n")


def read_transcript(path: str | os.PathLike) -> list[Turn]:
    turns = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            try:
                turns.append(Turn(**json.loads(line)))
            except (json.JSONDecodeError, TypeError) as e:
                raise ValueError(f"{path}:{line_no}: not a transcript line ({e})") from None
    return turns
