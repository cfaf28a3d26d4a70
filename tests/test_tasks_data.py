"""Task specs, sources, bad data, splits, synthetic arithmetic and `evaluate`."""

from __future__ import annotations

import ast
import json
import operator
import re
import sys
from pathlib import Path

import grain
import ml_collections
import pytest

from agora_jax.tasks import (
    Example, SplitOverlapError, Task, TaskDataError, data_root, evaluate, get_task, task_from_spec,
)
from agora_jax.tasks.task import INSTRUCTIONS

UNSEEN = [  # a benchmark the code has never seen: its own field names, gold inside a rationale
    {"uid": "a1", "story": "Ann has 3 pens.", "ask": "She buys 4 more. How many now?", "label": "3+4 => 7"},
    {"uid": "a2", "story": "Bo has 10 figs.", "ask": "He eats 2. How many left?", "label": "10-2 => 8"},
    {"uid": "a3", "story": "Cy has 5 bags of 6.", "ask": "How many in all?", "label": "5*6 => 30"},
    {"uid": "a4", "story": "Di has 9 cups.", "ask": "She breaks 9. How many left?", "label": "9-9 => 0"},
    {"uid": "a5", "story": "Ed has 1,200 m.", "ask": "He runs 300 m. How far left?", "label": "=> 900"},
]
UNSEEN_SPEC = {
    "name": "unseen_math",
    "question_template": "{story} {ask}",
    "answer_field": "label",
    "answer_pattern": r"=>\s*(\S+)",
    "answer_type": "number",
    "id_field": "uid",
    "n_dev": 2,
    "seed": 3,
}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_unseen_jsonl_benchmark_from_a_spec_dict(tmp_path):
    path = write_jsonl(tmp_path / "unseen.jsonl", UNSEEN)
    task = task_from_spec({**UNSEEN_SPEC, "path": str(path)})
    assert (len(task.dev), len(task.test)) == (2, 3)
    everything = {e.id: e for e in task.dev + task.test}
    ann = everything["unseen_math/a1"]
    assert ann.question == "Ann has 3 pens. She buys 4 more. How many now?"
    assert ann.answer == "7" and ann.answer_type == "number"
    assert ann.messages[0]["role"] == "user" and ann.messages[0]["content"].startswith(ann.question)
    assert "\\boxed{}" in ann.messages[0]["content"]
    assert everything["unseen_math/a5"].answer == "900"
    replies = {"a1": "3 + 4 = 7 pens. \\boxed{7}", "a2": "The answer is 8.", "a3": "5 * 6 = 31",
               "a4": "I cannot tell.", "a5": "The answer is 900 m"}
    result = evaluate([replies[e.id.split("/")[1]] for e in task.test], task)
    expected = {"a1": 1.0, "a2": 1.0, "a3": 0.0, "a4": 0.0, "a5": 1.0}
    assert result.correct == [expected[e.id.split("/")[1]] for e in task.test]
    assert result.n_extraction_failures == sum(e.id.endswith("a4") for e in task.test)


def test_choice_spec_via_configdict_and_hf_json_builder(tmp_path):
    records = [{"q": f"Pick the color number {i}", "opts": ["red", "green", "blue"], "gold": i % 3}
               for i in range(6)]
    path = write_jsonl(tmp_path / "colors.jsonl", records)
    config = ml_collections.ConfigDict({"name": "colors", "path": str(path), "question_field": "q",
                                        "choices_field": "opts", "answer_field": "gold",
                                        "answer_type": "choice", "n_dev": 2})
    task = task_from_spec(config)
    hf_config = {k: v for k, v in config.to_dict().items() if k != "path"}
    hf = task_from_spec({**hf_config, "test": {"kind": "hf", "path": "json", "data_files": str(path)}})
    assert [(e.question, e.answer, e.choices) for e in task.test] == \
        [(e.question, e.answer, e.choices) for e in hf.test]
    first = next(e for e in task.dev + task.test if e.question.endswith("number 0"))
    assert first.answer == "A" and first.choices == ("red", "green", "blue")
    assert "(B) green" in first.messages[0]["content"]
    result = evaluate(["The answer is (A)", "The answer is green", "(C)", "no idea"],
                      [first, first, first, first])
    assert result.correct == [1.0, 0.0, 0.0, 0.0]
    assert result.extracted == ["A", "B", "C", None]
    assert result.n_extraction_failures == 1 and result.accuracy == 0.25


def test_missing_data_package_is_named_with_the_install_command(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "colors.jsonl", [{"q": "Pick", "opts": ["red", "blue"], "gold": 0}])
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    spec = {"name": "colors", "question_field": "q", "choices_field": "opts", "answer_field": "gold",
            "answer_type": "choice", "test": {"kind": "hf", "path": "json", "data_files": str(path)}}
    with pytest.raises(TaskDataError, match=r"source kind 'hf' \(json\) needs the 'datasets' package.*pip install datasets"):
        task_from_spec(spec)


def test_tfds_source(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")

    class TinyQa(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict({"question": tfds.features.Text(),
                                                   "answer": tfds.features.Text()})
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {"test": self._generate_examples()}

        def _generate_examples(self):
            for i in range(6):
                yield i, {"question": f"What is {i}+1?", "answer": str(i + 1)}

    TinyQa(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    task = task_from_spec({"name": "tiny_qa", "test": {"kind": "tfds", "path": "tiny_qa", "split": "test"},
                           "answer_type": "number", "n_dev": 2, "data_root": str(tmp_path)})
    pairs = {(e.question, e.answer) for e in task.dev + task.test}
    assert pairs == {(f"What is {i}+1?", str(i + 1)) for i in range(6)}


@pytest.mark.parametrize("content,message", [
    ('{"question": "q1", "answer": "1"}\n{"question": "q2"}\n', "bad.jsonl:2: missing field 'answer'"),
    ('{"question": "q1", "answer": "1"}\n\n{"question": "q2", "answer": 2\n', "bad.jsonl:3: malformed JSON"),
    ("", "bad.jsonl: no records"),
    ('{"question": "", "answer": "1"}\n', "bad.jsonl:1: missing field 'question'"),
    ('["not", "an", "object"]\n', "bad.jsonl:1: expected a JSON object"),
])
def test_bad_data_names_file_and_line(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(TaskDataError, match=message.replace("(", r"\(")):
        task_from_spec({"name": "bad", "path": str(tmp_path / "bad.jsonl"), "n_dev": 0})


def test_bad_data_in_templates_choices_and_json_files(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"a": "x", "answer": "1"}])
    with pytest.raises(TaskDataError, match=r"t.jsonl:1: missing field 'b'"):
        task_from_spec({"name": "t", "path": str(path), "question_template": "{a} {b}", "n_dev": 0})
    path = write_jsonl(tmp_path / "c.jsonl", [{"question": "q", "choices": ["x", "y"], "answer": 1},
                                              {"question": "r", "choices": ["x", "y"], "answer": 5}])
    with pytest.raises(TaskDataError, match=r"c.jsonl:2: field 'answer' = 5 is not an option index"):
        task_from_spec({"name": "c", "path": str(path), "choices_field": "choices", "answer_type": "choice"})
    (tmp_path / "b.json").write_text('{"examples": [\n{"input": "x", "target": "y"},\n{"input": }\n]}')
    with pytest.raises(TaskDataError, match=r"b.json:3: malformed JSON"):
        task_from_spec({"name": "b", "test": {"path": str(tmp_path / "b.json"), "records_key": "examples"}})
    with pytest.raises(TaskDataError, match=r"missing.jsonl: file not found"):
        task_from_spec({"name": "m", "path": str(tmp_path / "missing.jsonl")})
    with pytest.raises(ValueError, match=r"unknown task spec field\(s\) \['question_feild'\]"):
        task_from_spec({"name": "m", "path": str(path), "question_feild": "a"})


def test_evaluate_counts_extraction_failures_and_never_crashes():
    task = get_task("synthetic", n_test=6, n_dev=2, n_train=0, seed=1)
    gold = [e.answer for e in task.test]
    replies = [gold[0], f"The answer is {gold[1]}", None, "", "no digits here at all", "\\boxed{}"]
    result = evaluate(replies, task)
    assert result.correct == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert result.extracted == gold[:2] + [None, None, None, None]
    assert result.n_extraction_failures == 4 and result.accuracy == pytest.approx(2 / 6)
    assert result.summary() == {"accuracy": pytest.approx(1 / 3), "n": 6, "extraction_failures": 4}
    with pytest.raises(ValueError, match="5 predictions for 6 items"):
        evaluate(replies[:5], task)


def test_splits_deterministic_disjoint_and_sized():
    a, b = get_task("mawps/multiarith", n_dev=40, seed=7), get_task("mawps/multiarith", n_dev=40, seed=7)
    c = get_task("mawps/multiarith", n_dev=40, seed=8)
    assert [e.id for e in a.dev] == [e.id for e in b.dev] and [e.id for e in a.test] == [e.id for e in b.test]
    assert [e.id for e in a.dev] != [e.id for e in c.dev]
    # multiarith repeats 20 questions: duplicates stay on one side, so dev may exceed n_dev slightly
    assert 40 <= len(a.dev) <= 42 and len(a.dev) + len(a.test) == 600
    norm = lambda xs: {" ".join(e.question.lower().split()) for e in xs}  # noqa: E731
    assert not norm(a.dev) & norm(a.test)
    small = get_task("mawps/multiarith", n_dev=40, n_test=100, seed=7)
    assert [e.id for e in small.dev] == [e.id for e in a.dev] and len(small.test) == 100
    assert {e.id for e in small.test} <= {e.id for e in a.test}


def test_gsm8k_dev_comes_from_train():
    task = get_task("gsm8k", n_dev=32, seed=0)
    assert len(task.dev) == 32 and len(task.test) == 1319 and len(task.split("train")) == 7473 - 32
    assert all(e.id.startswith("gsm8k/train/") for e in task.dev)  # lines of train.jsonl
    assert task.test[0].answer == "18" and task.test[0].solution.endswith("#### 18")


def test_overlapping_dev_and_test_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "same.jsonl", [{"question": f"Q {i}?", "answer": str(i)} for i in range(5)])
    other = write_jsonl(tmp_path / "train.jsonl", [{"question": "q  3?", "answer": "3"}, {"question": "new", "answer": "1"}])
    with pytest.raises(SplitOverlapError, match=r"task leaky: dev and test share 1 question\(s\), e.g. 'q  3\?'"):
        task_from_spec({"name": "leaky", "path": str(path), "dev_path": str(other), "n_dev": 2})
    example = Example("x", "Same question", [], "1", "number")
    with pytest.raises(SplitOverlapError, match="task manual"):
        Task("manual", "number", {"dev": [example], "test": [example]})


def _evaluate_arithmetic(text: str) -> int:
    """Independent check of a synthetic question: Python's own parse tree, no eval."""
    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.BinOp):
            return ops[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):  # negative intermediate step
            return -walk(node.operand)
        assert isinstance(node, ast.Constant)
        return node.value

    return walk(ast.parse(text, mode="eval").body)


def test_synthetic_task_is_seeded_correct_and_compact():
    task = get_task("synthetic", digits=2, steps=3, n_train=300, n_dev=50, n_test=50, seed=5)
    again = get_task("synthetic", digits=2, steps=3, n_train=300, n_dev=50, n_test=50, seed=5)
    other = get_task("synthetic", digits=2, steps=3, n_train=300, n_dev=50, n_test=50, seed=6)
    assert [e.question for e in task.test] == [e.question for e in again.test]
    assert [e.question for e in task.test] != [e.question for e in other.test]
    for e in task.test + task.dev + task.split("train"):
        expression = e.question.removesuffix("=")
        assert e.question.endswith("=") and e.messages == [{"role": "user", "content": e.question}]
        assert sum(expression.count(op) for op in "+-*") == 3
        assert all(len(n) <= 2 for n in expression.replace("+", " ").replace("-", " ").replace("*", " ").split())
        assert int(e.answer) == _evaluate_arithmetic(expression) >= 0 and e.solution == e.answer
    questions = [e.question for e in task.test + task.dev + task.split("train")]
    assert len(set(questions)) == 400
    # the test set does not depend on the sizes of the other splits
    bigger = get_task("synthetic", digits=2, steps=3, n_train=10, n_dev=80, n_test=50, seed=5)
    assert [e.question for e in bigger.test] == [e.question for e in task.test]
    assert evaluate([e.answer for e in task.test], task).accuracy == 1.0
    assert evaluate([str(int(e.answer) + 1) for e in task.test], task).accuracy == 0.0


def test_synthetic_chat_style_and_knobs():
    task = task_from_spec({"name": "synthetic", "digits": 1, "steps": 2, "ops": "+*", "style": "chat",
                           "n_train": 0, "n_dev": 5, "n_test": 5})
    e = task.test[0]
    a, op1, b, op2, c = e.question.removeprefix("What is ").removesuffix("?").split(" ")  # "What is 3 + 4 * 2?"
    assert op1 in "+*" and op2 in "+*" and all(x.isdigit() for x in (a, b, c))
    assert e.messages[-1]["content"] == f"{e.question}\n\n{INSTRUCTIONS['number']}"  # what chat models are asked
    assert e.solution.endswith(f"The answer is {e.answer}.")
    assert evaluate([x.solution for x in task.test], task).accuracy == 1.0
    with pytest.raises(ValueError, match="only 100 distinct problems"):
        get_task("synthetic", digits=1, steps=1, ops="+", n_train=200, n_dev=0, n_test=0)


def test_synthetic_steps_style_works_it_out_in_compact_steps():
    task = get_task("synthetic", digits=1, steps=2, ops="+-*", style="steps", n_train=50, n_dev=10, n_test=10, seed=2)
    compact = get_task("synthetic", digits=1, steps=2, ops="+-*", n_train=50, n_dev=10, n_test=10, seed=2)
    assert [e.question for e in task.test] == [e.question for e in compact.test]
    for e in task.test + task.dev + task.split("train"):
        steps = e.solution.split(",")
        assert len(steps) == 2 and steps[-1].endswith(f"={e.answer}")
        for step in steps:  # each step is a true equation
            lhs, rhs = step.split("=")
            assert _evaluate_arithmetic(lhs) == int(rhs)
    assert evaluate([e.solution for e in task.test], task).accuracy == 1.0  # graded by its last number


def test_synthetic_modulus_takes_every_step_mod_m():
    task = get_task("synthetic", digits=1, steps=2, ops="+-*", style="steps", modulus=10, n_train=3000, n_dev=10,
                    n_test=10, seed=2)
    plain = get_task("synthetic", digits=1, steps=2, ops="+-*", style="steps", n_train=50, n_dev=10, n_test=10, seed=2)
    assert task.test[0].question == plain.test[0].question  # same stream; only the arithmetic differs
    wrapped = 0
    for e in task.test + task.dev + task.split("train"):
        for step in e.solution.split(","):
            lhs, rhs = step.split("=")
            assert 0 <= int(rhs) < 10 and int(rhs) == _evaluate_arithmetic(lhs) % 10
            wrapped += _evaluate_arithmetic(lhs) != int(rhs)
    assert wrapped > 1000  # many steps leave 0..9 before the mod
    with pytest.raises(ValueError, match="modulus=-1"):
        get_task("synthetic", modulus=-1)


def test_synthetic_constants_are_letters_with_one_seeded_value_each():
    task = get_task("synthetic", digits=1, steps=2, ops="+-", style="steps", modulus=10, constants=6, n_train=1000,
                    n_dev=10, n_test=10, seed=3)
    value = {}
    for e in task.test + task.dev + task.split("train"):
        letter, rest = e.question[0], e.question[1:]
        assert letter in "abcdef" and re.fullmatch(r"([+-][0-9]){2}=", rest)
        recall, *work = e.solution.split(",")
        assert recall[:2] == f"{letter}=" and value.setdefault(letter, recall[2:]) == recall[2:]  # one value per letter
        number = _evaluate_arithmetic(value[letter] + rest.rstrip("="))
        assert int(e.answer) == number % 10 and e.answer == work[-1].split("=")[1]
        assert work[0].startswith(value[letter])  # the first step uses the recalled value
    assert sorted(value) == list("abcdef") and len(set(value.values())) > 2
    again = get_task("synthetic", digits=1, steps=2, ops="+-", style="steps", modulus=10, constants=6, n_train=1000,
                     n_dev=10, n_test=10, seed=3)
    assert [e.solution for e in again.test] == [e.solution for e in task.test]
    with pytest.raises(ValueError, match="constants=27"):
        get_task("synthetic", constants=27)


def test_synthetic_pairs_combine_one_experts_letters_in_train_two_experts_elsewhere():
    """A pair problem recalls both letters first; in train both belong to one expert (ord mod groups),
    in test and dev to two, so no expert's own training shows both facts together."""
    kwargs = dict(digits=1, steps=2, ops="+", style="steps", modulus=10, constants=26, n_train=900, n_dev=100,
                  n_test=100, seed=4, groups=3)
    task = get_task("synthetic", pairs=0.3, **kwargs)
    value, pairs = {}, {"test": 0, "dev": 0, "train": 0}
    for split in pairs:
        for e in task.split(split):
            letters = [c for c in e.question if c.isalpha()]
            recalls = e.solution.split(",")[:len(letters)]
            for letter, recall in zip(letters, recalls):
                assert recall[:2] == f"{letter}=" and value.setdefault(letter, recall[2:]) == recall[2:]
            digits = e.question.rstrip("=").split("+")[len(letters):]
            assert int(e.answer) == (sum(int(value[c]) for c in letters) + sum(map(int, digits))) % 10
            assert e.group == letters[0]
            if len(letters) == 2:
                pairs[split] += 1
                same_expert = ord(letters[0]) % 3 == ord(letters[1]) % 3
                assert same_expert == (split == "train") and letters[0] != letters[1]
    assert all(0.2 * len(task.split(split)) < n < 0.5 * len(task.split(split)) for split, n in pairs.items()), pairs
    plain = get_task("synthetic", **kwargs)  # pairs=0: the stream of problems as before the knob
    assert [e.question for e in plain.test] == [e.question for e in get_task("synthetic", pairs=0.0, **kwargs).test]
    assert all(sum(c.isalpha() for c in e.question) == 1 for e in plain.test + plain.split("train"))
    with pytest.raises(ValueError, match="pairs=0.3"):
        get_task("synthetic", constants=4, pairs=0.3)
    # anywhere: the letters at random operand positions, recalled in order first
    spread = get_task("synthetic", pairs=0.3, anywhere=True, **kwargs)
    positions = set()
    for e in spread.test + spread.split("train"):
        operands = e.question.rstrip("=").split("+")
        letters = [k for k, x in enumerate(operands) if x.isalpha()]
        positions.update(letters)
        recalls = e.solution.split(",")[:len(letters)]
        assert [r.split("=")[0] for r in recalls] == [operands[k] for k in letters] and e.group == operands[letters[0]]
        numbers = [int(value[x]) if x.isalpha() else int(x) for x in operands]
        assert int(e.answer) == sum(numbers) % 10
    assert positions == {0, 1, 2}


def test_data_root_override_and_grain_dataset(tmp_path, monkeypatch):
    monkeypatch.delenv("AGORA_JAX_DATA", raising=False)
    assert data_root() == (Path(__file__).resolve().parents[2] / "shared" / "data").resolve()
    (tmp_path / "gsm8k").mkdir()
    write_jsonl(tmp_path / "gsm8k" / "test.jsonl", [{"question": f"Q{i}", "answer": f"#### {i}"} for i in range(4)])
    write_jsonl(tmp_path / "gsm8k" / "train.jsonl", [{"question": f"T{i}", "answer": f"#### {i}"} for i in range(6)])
    monkeypatch.setenv("AGORA_JAX_DATA", str(tmp_path))
    task = get_task("gsm8k", n_dev=3)
    assert data_root() == tmp_path and len(task.test) == 4 and len(task.dev) == 3
    monkeypatch.delenv("AGORA_JAX_DATA")
    assert len(get_task("gsm8k", n_dev=1, data_root=str(tmp_path)).split("train")) == 5  # by argument
    dataset = task.dataset("test")
    assert isinstance(dataset, grain.MapDataset) and len(dataset) == 4 and dataset[2].answer == "2"
    shuffled = [dataset.shuffle(seed=0)[i].id for i in range(4)]
    assert sorted(shuffled) == sorted(e.id for e in task.test)
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        get_task("nope")
