"""Tasks: data source + prompt + answer extraction + grading + seeded dev/test splits.

    task = get_task("gsm8k", n_dev=64, seed=1)          # or "math500", "mawps/addsub", "bbh/snarks", ...
    task = get_task("synthetic", digits=2, steps=2)      # "12+7*3=" -> "33", for tiny models on CPU
    task = task_from_spec({"name": "mine", "path": "/data/mine.jsonl", "answer_type": "number"})
    task.dev[0].messages                                  # chat messages for the tokenizer's template
    evaluate(replies, task).accuracy                      # extraction + grading, failures counted
"""

from agora_jax.tasks.builtin import BBH_SUBTASKS, BUILTIN_SPECS, get_task, task_from_spec, task_names
from agora_jax.tasks.evaluate import EvalResult, evaluate
from agora_jax.tasks.extract import ANSWER_TYPES, extract_answer, last_boxed, parse_options
from agora_jax.tasks.grade import choice_match, exact_match, grade, token_f1
from agora_jax.tasks.math_equiv import is_equiv, normalize_math
from agora_jax.tasks.sources import Source, TaskDataError, data_root, load_rows
from agora_jax.tasks.spec import TaskSpec, build_task, spec_from_dict
from agora_jax.tasks.splits import SplitOverlapError, carve, check_disjoint, question_key, subsample
from agora_jax.tasks.synthetic import synthetic_task
from agora_jax.tasks.task import Example, Task, build_messages

__all__ = [
    "ANSWER_TYPES", "BBH_SUBTASKS", "BUILTIN_SPECS", "EvalResult", "Example", "Source",
    "SplitOverlapError", "Task", "TaskDataError", "TaskSpec", "build_messages", "build_task", "carve",
    "check_disjoint", "choice_match", "data_root", "evaluate", "exact_match", "extract_answer",
    "get_task", "grade", "is_equiv", "last_boxed", "load_rows", "normalize_math", "parse_options",
    "question_key", "spec_from_dict", "subsample", "synthetic_task", "task_from_spec", "task_names",
    "token_f1",
]
