"""TaskSpec: a benchmark described as data (fields, answer type, splits), and how it becomes a Task."""

from __future__ import annotations

import dataclasses
import os
import re
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agora_jax.tasks.extract import ANSWER_TYPES, parse_options
from agora_jax.tasks.numeric import format_number, parse_number
from agora_jax.tasks.sources import Row, Source, TaskDataError, data_root, load_rows
from agora_jax.tasks.splits import carve, question_key, subsample
from agora_jax.tasks.task import Example, Task, build_messages


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A benchmark as configuration.

    The test split comes from `test`; the dev split is carved (by `seed`) from `dev` when given
    (what is left of it becomes "train"), else from a disjoint part of `test`.
    The question is `question_field`, or `question_template` formatted with the record's fields
    ("{body} {question}"). `answer_pattern` is a regex whose group 1 is the gold inside
    `answer_field` ("#### (.+)" for GSM8K). Options come from `choices_field` (a list; the gold may
    be an index, a letter or the option text) or, with `choices_in_question`, from "(A) ..." lines.
    """

    name: str
    test: Source
    dev: Source | None = None
    answer_type: str = "exact"
    question_field: str = "question"
    question_template: str | None = None
    answer_field: str = "answer"
    answer_pattern: str | None = None
    choices_field: str | None = None
    choices_in_question: bool = False
    solution_field: str | None = None
    id_field: str | None = None
    instruction: str | None = None
    system_prompt: str | None = None
    n_dev: int = 100
    n_test: int | None = None
    seed: int = 0
    data_root: str | None = None

    def __post_init__(self) -> None:
        if self.answer_type not in ANSWER_TYPES:
            raise ValueError(f"task {self.name}: unknown answer_type {self.answer_type!r}; "
                             f"expected one of {ANSWER_TYPES}")


class _Fields(dict):
    """Record fields for str.format_map; a missing field is a data error naming the location."""

    def __init__(self, record: Mapping[str, Any], where: str):
        super().__init__(record)
        self.where = where

    def __missing__(self, key: str) -> Any:
        raise TaskDataError(f"{self.where}: missing field {key!r}")


def _field(row: Row, name: str) -> Any:
    value = row.record.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise TaskDataError(f"{row.where}: missing field {name!r}")
    return value


def _choices(spec: TaskSpec, row: Row, question: str) -> tuple[str, ...] | None:
    if spec.choices_field is not None:
        value = _field(row, spec.choices_field)
        if not isinstance(value, list) or not value:
            raise TaskDataError(f"{row.where}: field {spec.choices_field!r} must be a non-empty list")
        return tuple(str(c) for c in value)
    if spec.choices_in_question:
        options = parse_options(question)
        if options is None:
            raise TaskDataError(f"{row.where}: no '(A) ...' option lines in field {spec.question_field!r}")
        return options
    return None


def _gold(spec: TaskSpec, row: Row, choices: tuple[str, ...] | None) -> str:
    raw = _field(row, spec.answer_field)
    if spec.answer_pattern is not None:
        m = re.search(spec.answer_pattern, str(raw))
        if m is None:
            raise TaskDataError(
                f"{row.where}: field {spec.answer_field!r} does not match {spec.answer_pattern!r}")
        raw = m.group(1)
    if spec.answer_type == "choice":
        return _choice_gold(raw, choices, row, spec.answer_field)
    text = str(raw).strip()
    value = parse_number(text) if spec.answer_type == "number" else None
    return format_number(value) if value is not None else text


def _choice_gold(raw: Any, choices: tuple[str, ...] | None, row: Row, field: str) -> str:
    """Gold option as a letter; text that names no option is kept (a few BBH items are like that)."""
    letters = string.ascii_uppercase[: len(choices) if choices else 26]
    if isinstance(raw, int) and not isinstance(raw, bool):
        if not 0 <= raw < len(letters):
            raise TaskDataError(f"{row.where}: field {field!r} = {raw} is not an option index")
        return letters[raw]
    text = str(raw).strip()
    letter = re.fullmatch(r"\(?([A-Z])\)?", text)
    if letter and letter.group(1) in letters:
        return letter.group(1)
    matches = [i for i, c in enumerate(choices or ()) if c.strip().lower() == text.lower()]
    return letters[matches[0]] if len(matches) == 1 else text


def _example(spec: TaskSpec, row: Row, example_id: str) -> Example:
    if spec.question_template is not None:
        question = spec.question_template.format_map(_Fields(row.record, row.where)).strip()
    else:
        question = str(_field(row, spec.question_field)).strip()
    choices = _choices(spec, row, question)
    prompt = question
    if spec.choices_field is not None and choices:
        prompt += "\n" + "\n".join(f"({string.ascii_uppercase[i]}) {c}" for i, c in enumerate(choices))
    solution = row.record.get(spec.solution_field) if spec.solution_field else None
    return Example(
        id=f"{spec.name}/{row.record[spec.id_field]}" if spec.id_field in row.record else example_id,
        question=question,
        messages=build_messages(prompt, spec.answer_type, spec.instruction, spec.system_prompt),
        answer=_gold(spec, row, choices),
        answer_type=spec.answer_type,
        choices=choices,
        solution=None if solution is None else str(solution),
    )


def _examples(spec: TaskSpec, source: Source, root: Path, pool: str) -> list[Example]:
    return [_example(spec, row, f"{spec.name}/{pool}/{i}") for i, row in enumerate(load_rows(source, root))]


def _question_key(example: Example) -> str:
    return question_key(example.question)


def build_task(spec: TaskSpec) -> Task:
    """Loads the records of `spec` and forms its seeded, disjoint splits."""
    root = data_root(spec.data_root)
    test_pool = _examples(spec, spec.test, root, "test")
    splits: dict[str, list[Example]] = {}
    if spec.dev is None:
        splits["dev"], test_pool = carve(test_pool, spec.n_dev, spec.seed, _question_key)
    else:
        dev_pool = _examples(spec, spec.dev, root, "train")
        splits["dev"], splits["train"] = carve(dev_pool, spec.n_dev, spec.seed, _question_key)
    splits["test"] = subsample(test_pool, spec.n_test, spec.seed)
    return Task(spec.name, spec.answer_type, splits)


def _source(value: str | Mapping[str, Any] | Source) -> Source:
    if isinstance(value, Source):
        return value
    if isinstance(value, (str, os.PathLike)):
        return Source(str(value))
    fields = dict(value)
    if fields.get("fallback") is not None:
        fields["fallback"] = _source(fields["fallback"])
    return Source(**fields)


def spec_from_dict(config: Mapping[str, Any]) -> TaskSpec:
    """TaskSpec from plain data. `test`/`dev` may be a path string or a Source dict; `path` and
    `dev_path` are shorthands for local files."""
    fields = dict(config.to_dict() if hasattr(config, "to_dict") else config)
    if "path" in fields:
        fields["test"] = fields.pop("path")
    if "dev_path" in fields:
        fields["dev"] = fields.pop("dev_path")
    for name in ("test", "dev"):
        if fields.get(name) is not None:
            fields[name] = _source(fields[name])
    unknown = set(fields) - {f.name for f in dataclasses.fields(TaskSpec)}
    if unknown:
        raise ValueError(f"unknown task spec field(s) {sorted(unknown)}")
    return TaskSpec(**fields)
