"""What a run's stored outputs imply, for tests: a collaboration's final answers re-derived from the turns
its strategy reads them from, the items its vote is bound to get right, and a run's results.json and
report.md checked against the transcripts it stored."""

from __future__ import annotations

import json
import pathlib
import statistics
from typing import Callable, Sequence

import ml_collections
import pytest

from agora_jax.evolution.config import make_task
from agora_jax.strategies import Turn, read_transcript
from agora_jax.strategies.answers import answer_key, extract, voted_text
from agora_jax.strategies.debate import likeliest_texts
from agora_jax.tasks import Example, evaluate

# the role of the turns that hold a strategy's final answers (one per item, in the last round of that role)
FINAL_ROLES = {"moa": "aggregate", "multiagent_refine": "final", "llm_blender": "fuse", "logit_fusion": "fuse",
               "trained_router": "answer", "graph_router": "answer", "dare_ties": "answer", "weight_average": "answer"}
VOTED = ("debate", "self_consistency", "multiagent_finetuning")  # the vote over the last round's answers


def final_answers(strategy: str, turns: Sequence[Turn], items: Sequence[Example],
                  select: str = "vote") -> list[str] | None:
    """The final answer per item as the transcript shows it (`select`: debate's vote, or its vote
    weighted by the answers' recorded log-probabilities); None for agora, whose vote is over the
    peer-validated solutions (the transcript does not mark which)."""
    roles = ("answer", "debate") if strategy in VOTED else (FINAL_ROLES[strategy],) if strategy in FINAL_ROLES else ()
    if not roles:
        return None
    last = max(t.round for t in turns if t.role in roles)
    if select == "confidence":
        return likeliest_texts(items, [t for t in turns if t.role in roles and t.round == last])
    said: dict[str, list[str]] = {}
    for t in turns:
        if t.role in roles and t.round == last:
            said.setdefault(t.item_id, []).append(t.output)
    if strategy in VOTED:
        return [voted_text(said[ex.id], ex) for ex in items]
    assert all(len(said[ex.id]) == 1 for ex in items), strategy
    return [said[ex.id][0] for ex in items]


def plurality_items(turns: Sequence[Turn], items: Sequence[Example], keep: Callable[[Turn], bool]) -> set[str]:
    """Ids of the items whose gold answer is stated by more of the `keep` turns than any other answer:
    those a majority vote over them must get right."""
    by_id = {ex.id: ex for ex in items}
    said: dict[str, list[str | None]] = {}
    for t in turns:
        if t.item_id in by_id and keep(t):
            said.setdefault(t.item_id, []).append(extract(t.output, by_id[t.item_id]))
    found = set()
    for item_id, answers in said.items():
        gold = answer_key(by_id[item_id].answer, by_id[item_id].answer_type)
        others = [answers.count(a) for a in set(answers) if a != gold and a is not None]
        if answers.count(gold) > max(others, default=0):
            found.add(item_id)
    return found


def markdown_rows(text: str) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the accuracy table in `text` (report.md, or what a notebook printed)."""
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in text.splitlines() if line.startswith("| ")]
    return rows[0], rows[1:]


def assert_results_are_the_stored_outputs(workdir: pathlib.Path, strategy: str) -> None:
    """results.json's accuracies are the stored test transcripts re-graded (each member's answers, the
    collaboration's final answers), its mean and std are theirs, and report.md's table shows those numbers."""
    results = json.loads((workdir / "results.json").read_text())
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    task = make_task(config.task)
    header, rows = markdown_rows((workdir / "report.md").read_text())
    assert header[0] == "round" and {*results["single"], "single mean ± std", "collaboration"} <= set(header)
    assert [row[0] for row in rows] == [str(r) for r in range(len(results["multi"]))]
    for r, row in enumerate(rows):
        turns = read_transcript(workdir / "transcripts" / f"round{r}_test.jsonl")
        said = {(t.model, t.item_id): t.output for t in turns if t.role == "single"}
        singles = [results["single"][name][r] for name in results["single"]]
        for name, acc in zip(results["single"], singles):
            assert acc == evaluate([said[(name, ex.id)] for ex in task.test], task, "test").accuracy, (r, name)
            assert float(row[header.index(name)]) == pytest.approx(100 * acc, abs=0.05), (r, name)
        answers = final_answers(strategy, turns, task.test, config.strategy.get("select", "vote"))
        if answers is not None:
            assert results["multi"][r] == evaluate(answers, task, "test").accuracy, r
        assert float(row[header.index("collaboration")]) == pytest.approx(100 * results["multi"][r], abs=0.05)
        mean, std = statistics.fmean(singles), statistics.pstdev(singles)
        assert (results["single_mean"][r], results["single_std"][r]) == (pytest.approx(mean), pytest.approx(std))
        shown = [float(x) for x in row[header.index("single mean ± std")].split("±")]
        assert shown == [pytest.approx(100 * mean, abs=0.05), pytest.approx(100 * std, abs=0.05)], r
