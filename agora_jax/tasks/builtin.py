"""The built-in tasks (specs over the files in the data root, with their hub copies as fallback),
`get_task` and `task_from_spec`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from agora_jax.tasks.sources import Source
from agora_jax.tasks.spec import TaskSpec, build_task, spec_from_dict
from agora_jax.tasks.synthetic import synthetic_task
from agora_jax.tasks.task import Task


def _local(path: str, hub: Source, **kwargs: Any) -> Source:
    """A file under the data root, read from its `hub` copy when the file is absent."""
    return Source(path, fallback=hub, **kwargs)


BBH_SUBTASKS = {  # the 27 BIG-Bench Hard subtasks and how they are graded
    **dict.fromkeys(
        ["date_understanding", "disambiguation_qa", "geometric_shapes", "hyperbaton",
         "logical_deduction_five_objects", "logical_deduction_seven_objects",
         "logical_deduction_three_objects", "movie_recommendation", "penguins_in_a_table",
         "reasoning_about_colored_objects", "ruin_names", "salient_translation_error_detection",
         "snarks", "temporal_sequences", "tracking_shuffled_objects_five_objects",
         "tracking_shuffled_objects_seven_objects", "tracking_shuffled_objects_three_objects"],
        "choice"),
    **dict.fromkeys(
        ["boolean_expressions", "causal_judgement", "dyck_languages", "formal_fallacies", "navigate",
         "sports_understanding", "web_of_lies", "word_sorting"],
        "exact"),
    **dict.fromkeys(["multistep_arithmetic_two", "object_counting"], "number"),
}


def _bbh(subtask: str, answer_type: str) -> TaskSpec:
    return TaskSpec(
        name=f"bbh/{subtask}",
        test=_local(f"bbh/{subtask}.json", Source("lukaemon/bbh", kind="hf", config=subtask, split="test"),
                    records_key="examples"),
        answer_type=answer_type,
        question_field="input",
        answer_field="target",
        choices_in_question=answer_type == "choice",
        n_dev=50,
    )


def _mawps(subset: str) -> TaskSpec:
    hub_file = f"hf://datasets/HuggingFaceTB/math_tasks/data/mawps/{subset}.jsonl"
    hub = Source("json", kind="hf", data_files=hub_file)
    return TaskSpec(name=f"mawps/{subset}", test=_local(f"mawps/{subset}.jsonl", hub), answer_type="number",
                    question_field="input", answer_field="target")


BUILTIN_SPECS: dict[str, TaskSpec] = {
    "gsm8k": TaskSpec(
        name="gsm8k",
        test=_local("gsm8k/test.jsonl", hub=Source("openai/gsm8k", kind="hf", config="main", split="test")),
        dev=_local("gsm8k/train.jsonl", hub=Source("openai/gsm8k", kind="hf", config="main", split="train")),
        answer_type="number",
        answer_pattern=r"####\s*(.+?)\s*$",
        solution_field="answer",
    ),
    "math500": TaskSpec(
        name="math500",
        test=_local("math500/test.jsonl", hub=Source("HuggingFaceH4/MATH-500", kind="hf", split="test")),
        answer_type="math",
        question_field="problem",
        solution_field="solution",
    ),
    **{f"mawps/{s}": _mawps(s) for s in ("addsub", "multiarith", "singleeq", "singleop")},
    "asdiv": TaskSpec(
        name="asdiv",
        test=_local("asdiv/test.jsonl", hub=Source("EleutherAI/asdiv", kind="hf", split="validation")),
        answer_type="number",
        question_template="{body} {question}",
        id_field="idx",
    ),
    "mmlu_stem": TaskSpec(
        name="mmlu_stem",
        test=_local("mmlu_stem/test.jsonl", hub=Source("TIGER-Lab/MMLU-STEM", kind="hf", split="test")),
        answer_type="choice",
        choices_field="choices",
    ),
    **{f"bbh/{s}": _bbh(s, t) for s, t in BBH_SUBTASKS.items()},
}


def task_names() -> list[str]:
    """Names `get_task` accepts."""
    return sorted(BUILTIN_SPECS) + ["synthetic"]


def get_task(name: str, **overrides: Any) -> Task:
    """A built-in task; `overrides` replace TaskSpec fields (n_dev, n_test, seed, data_root, ...)
    or, for "synthetic", set its knobs (digits, steps, ops, n_train, n_dev, n_test, seed, style)."""
    if name == "synthetic":
        return synthetic_task(**overrides)
    if name not in BUILTIN_SPECS:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(task_names())}")
    return build_task(dataclasses.replace(BUILTIN_SPECS[name], **overrides))


def task_from_spec(spec: TaskSpec | Mapping[str, Any]) -> Task:
    """A task from a TaskSpec, a dict or an ml_collections.ConfigDict.

    A mapping without a data source (`test`/`path`) names a built-in: {"name": "synthetic",
    "digits": 3} is get_task("synthetic", digits=3).
    """
    if isinstance(spec, TaskSpec):
        return build_task(spec)
    fields = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
    if "test" not in fields and "path" not in fields:
        return get_task(fields.pop("name"), **fields)
    return build_task(spec_from_dict(fields))
