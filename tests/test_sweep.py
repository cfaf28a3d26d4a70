"""The seeds sweep (statistics on hand-made results, sweep.md, the driver with a fake runner, the launcher)
and the compute-matched control of every evaluation (on a scripted pool, against hand computation)."""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from agora_jax.evolution import report, sweep
from agora_jax.evolution.control import collaboration_budget
from agora_jax.evolution.loop import evaluate_round
from agora_jax.evolution.settings import EvalSettings
from agora_jax.evolution.store import RunStore
from agora_jax.models import create, tiny_tokenizer
from agora_jax.sampling import Completion
from agora_jax.strategies import Turn, make_strategy, read_transcript
from agora_jax.pool import Member, Pool
from agora_jax.tasks import get_task

REPO = pathlib.Path(__file__).resolve().parents[1]
TOK = tiny_tokenizer()


# ---------------------------------------------------------------------------------------- statistics


def test_t_quantile_is_exact_at_tabulated_values():
    tabulated = {(0.975, 1): 12.706205, (0.975, 2): 4.302653, (0.975, 4): 2.776445, (0.975, 9): 2.262157,
                 (0.975, 30): 2.042272, (0.95, 10): 1.812461, (0.995, 5): 4.032143}
    for (p, df), t in tabulated.items():
        assert sweep.t_quantile(p, df) == pytest.approx(t, abs=5e-7), (p, df)
        assert sweep.t_quantile(1 - p, df) == pytest.approx(-t, abs=5e-7)
        assert sweep.t_cdf(t, df) == pytest.approx(p, abs=1e-7)
    assert sweep.t_cdf(0.0, 3) == 0.5 and sweep.t_cdf(1.0, 1) == pytest.approx(0.75)  # Cauchy: 1/2 + atan(1)/π
    with pytest.raises(ValueError, match="positive integer"):
        sweep.t_cdf(1.0, 0)


def test_t_interval_of_known_values():
    stat = sweep.interval([1, 2, 3, 4, 5])
    half = 2.776445 * math.sqrt(2.5) / math.sqrt(5)
    assert stat["n"] == 5 and stat["mean"] == 3.0
    assert stat["low"] == pytest.approx(3 - half, abs=1e-6) and stat["high"] == pytest.approx(3 + half, abs=1e-6)
    assert sweep.interval([0.4]) == {"n": 1, "mean": 0.4, "low": None, "high": None, "values": [0.4]}
    assert sweep.interval([])["mean"] is None


def _results(singles: dict[str, list[float]], multi: list[float], control: list[float] | None) -> dict:
    out = {"task": "t", "strategy": "s", "single": singles, "multi": multi}
    if control is not None:
        out["control"] = [{"samples": 9, "single": {}, "best": b} for b in control]
    return out


# three seeds, rounds 0..2; (best member r0, members' mean r0 / r2, collaboration r0 / r2, control r0)
SEEDS = {
    0: _results({"a": [0.50, 0.6, 0.70], "b": [0.30, 0.4, 0.50]}, [0.60, 0.6, 0.80], [0.45, 0.6, 0.7]),
    1: _results({"a": [0.40, 0.4, 0.40], "b": [0.40, 0.5, 0.60]}, [0.45, 0.5, 0.45], [0.50, 0.5, 0.5]),
    2: _results({"a": [0.20, 0.3, 0.40], "b": [0.60, 0.6, 0.60]}, [0.57, 0.6, 0.62], None),  # a run without control
}
# by hand: Δ1 = collab r0 - max(a0, b0); Δ2 = mean r2 - mean r0; Δ3 = collab r2 - collab r0
DELTA1 = [0.60 - 0.50, 0.45 - 0.40, 0.57 - 0.60]
DELTA2 = [0.60 - 0.40, 0.50 - 0.40, 0.50 - 0.40]
DELTA3 = [0.80 - 0.60, 0.45 - 0.45, 0.62 - 0.57]  # seed 1: no change, so not a seed showing it


def test_effects_are_paired_per_seed_and_counted():
    stats = sweep.aggregate(SEEDS, rounds=2)
    for key, want in (("delta1", DELTA1), ("delta2", DELTA2), ("delta3", DELTA3)):
        assert stats["effects"][key]["values"] == pytest.approx(want), key
        assert stats["effects"][key]["mean"] == pytest.approx(sum(want) / 3), key
    assert [stats["effects"][k]["positive"] for k in ("delta1", "delta2", "delta3")] == [2, 3, 2]
    control = stats["effects"]["delta1_control"]
    assert control["seeds"] == [0, 1] and control["values"] == pytest.approx([0.15, -0.05]) and control["positive"] == 1
    assert control["mean"] == pytest.approx(0.05) and control["high"] - control["mean"] == pytest.approx(
        12.706205 * 0.1, abs=1e-6)  # t(0.975, 1) · s / √2 with s = 0.1·√2
    round0 = stats["per_round"][0]
    assert round0["best_single"]["values"] == [0.5, 0.4, 0.6] and round0["collaboration"]["values"] == [0.6, 0.45, 0.57]
    assert round0["single_mean"]["mean"] == pytest.approx((0.4 + 0.4 + 0.4) / 3)
    assert round0["control"]["values"] == [0.45, 0.5] and round0["control_samples"] == [9]


def test_sweep_md_states_intervals_effects_and_failures(tmp_path):
    record = {"strategy": "debate", "task": "synthetic", "seeds": [0, 1, 2, 3],
              "runs": {"0": {"status": "done"}, "1": {"status": "done"}, "2": {"status": "done"},
                       "3": {"status": "failed", "returncode": 1}},
              "stats": sweep.aggregate(SEEDS, rounds=2)}
    sweep.write(tmp_path, record)
    text = (tmp_path / "sweep.md").read_text()
    assert "Seeds 0, 1, 2, 3: 3 finished." in text and "Student t" in text
    half = 4.302653 * 10 / math.sqrt(3)  # round 0 best member: 50, 40, 60 %, s = 10 %
    assert f"| 0 | 50.0 [{50 - half:.1f}, {50 + half:.1f}] |" in text
    d2 = sweep.interval(DELTA2)
    assert (f"| Δ2 | members' mean rR - r0 | +13.3 | [{100 * d2['low']:+.1f}, {100 * d2['high']:+.1f}] | 3 / 3 |"
            in text)
    assert "| Δ1 vs control | collaboration r0 - compute-matched control r0 | +5.0 | [-122.1, +132.1] | 1 / 2 |" \
        in text
    assert "| 2 | -3.0 | n/a | +10.0 | +5.0 |" in text  # seed 2's effects, no control
    assert "Failed, left out of the statistics: seed 3 (exit 1; output in seed3/sweep.log)." in text
    assert json.loads((tmp_path / "sweep.json").read_text())["stats"]["effects"]["delta3"]["positive"] == 2
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------------------- the driver


class FakeRunner:
    """Writes a finished run's results and config (seed `k`: collaboration 0.5 + k/100) unless the seed is
    in `fail`, where it stops after round 0 with exit status 1; records what it ran and what it found."""

    def __init__(self, rounds: int, config: dict, fail=()):
        self.rounds, self.config, self.fail = rounds, config, set(fail)
        self.calls: list[int] = []
        self.found_results: list[int] = []

    def __call__(self, seed: int, run_dir: pathlib.Path, cpus: list[int]) -> int:
        self.calls.append(seed)
        if (run_dir / "results.json").exists():
            self.found_results.append(seed)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps({**self.config, "seed": seed}))
        done = 1 if seed in self.fail else self.rounds + 1
        multi = [0.5 + seed / 100 + r / 10 for r in range(done)]
        report.write_results(run_dir, {"task": "t", "strategy": "s", "multi": multi,
                                       "single": {"a": [0.4] * done, "b": [0.45] * done}})
        return 1 if seed in self.fail else 0


def test_sweep_resumes_unfinished_seeds_and_reports_a_failed_one(tmp_path):
    config = {"rounds": 2, "seed": 0, "strategy": {"name": "debate"}, "task": {"name": "t", "n_test": 4}}
    first = FakeRunner(2, config, fail={2})
    record = sweep.run_sweep(tmp_path, [0, 1, 2, 3], 2, first, jobs=2, config=config, cores=[0, 1], log=lambda s: None)
    assert sorted(first.calls) == [0, 1, 2, 3]
    assert (record["runs"]["2"]["status"], record["runs"]["2"]["returncode"]) == ("failed", 1)
    assert record["stats"]["seeds"] == [0, 1, 3]  # the others kept
    assert record["stats"]["per_round"][0]["collaboration"]["values"] == pytest.approx([0.50, 0.51, 0.53])
    assert "# Seeds sweep: debate on t" in (text := (tmp_path / "sweep.md").read_text()) and "seed 2 (exit 1" in text

    other = {**config, "seed": 3, "task": {"name": "t", "n_test": 5}}
    (tmp_path / "seed3" / "config.json").write_text(json.dumps(other))
    second = FakeRunner(2, config)
    record = sweep.run_sweep(tmp_path, [0, 1, 2, 3], 2, second, jobs=2, config=config, cores=[0, 1],
                             log=lambda s: None)
    # finished seeds are skipped; seed 2 resumes from its partial run; seed 3 was made with another config
    assert sorted(second.calls) == [2, 3] and sorted(second.found_results) == [2, 3]
    assert record["runs"]["0"] == {"status": "done", "ran": False} and record["runs"]["2"]["status"] == "done"
    assert record["stats"]["seeds"] == [0, 1, 2, 3]
    assert record["stats"]["effects"]["delta3"]["values"] == pytest.approx([0.2] * 4)
    assert sweep.run_sweep(tmp_path, [0, 1], 2, FakeRunner(2, config, fail={0, 1}), jobs=2, config=config,
                           log=lambda s: None)["stats"]["seeds"] == [0, 1]  # nothing left to run


def test_merged_sweeps_give_the_statistics_of_one_sweep_over_all_their_seeds(tmp_path):
    config = {"rounds": 2, "seed": 0, "strategy": {"name": "debate"}, "task": {"name": "t", "n_test": 4}}
    quiet = dict(config=config, cores=[0], log=lambda s: None)
    whole = sweep.run_sweep(tmp_path / "whole", [0, 1, 2, 3], 2, FakeRunner(2, config), jobs=1, **quiet)
    sweep.run_sweep(tmp_path / "early", [0, 1], 2, FakeRunner(2, config), jobs=1, **quiet)
    early = str(tmp_path / "early" / "sweep.json")
    late = sweep.run_sweep(tmp_path / "late", [2, 3], 2, FakeRunner(2, config), jobs=1, merge=[early], **quiet)
    assert late["stats"] == whole["stats"]  # the same intervals, effects and per-seed effects, exactly
    assert late["seeds"] == [2, 3, 0, 1] and late["runs"]["0"] == {"status": "merged", "ran": False, "from": early}
    assert f"Merged from earlier sweeps of the same config: seeds 0, 1 ({early})." in (
        tmp_path / "late" / "sweep.md").read_text()
    refused = {  # each checked before any seed runs
        "already in the sweep": ([0, 5], config),
        "a sweep of 2 rounds, expected 3": ([5], {**config, "rounds": 3}),
        "its config differs": ([5], {**config, "task": {"name": "t", "n_test": 5}}),
        "a sweep of strategy 'debate'": ([5], {**config, "strategy": {"name": "moa"}}),
    }
    for message, (seeds, other) in refused.items():
        runner = FakeRunner(2, other)
        with pytest.raises(ValueError, match=f"{early}: .*{message}"):
            sweep.run_sweep(tmp_path / "refused", seeds, other["rounds"], runner, jobs=1, config=other, cores=[0],
                            log=lambda s: None, merge=[early])
        assert runner.calls == []
    with pytest.raises(ValueError, match="missing.json: not a readable sweep.json"):
        sweep.merged_curves([tmp_path / "missing.json"], [5], 2, config)


def test_concurrent_seeds_run_on_disjoint_cores(tmp_path):
    cores = sweep.available_cores()
    if len(cores) < 2:
        pytest.skip("needs 2 CPU cores")
    assert sweep.cpu_slots([0, 1, 2, 3], 2) == [[0, 2], [1, 3]] and sweep.cpu_slots([0, 1], 3) == [[0], [1], [0]]
    script = "import os, sys; print(sys.argv[1:], sorted(os.sched_getaffinity(0)))"
    runner = sweep.subprocess_runner([sys.executable, "-c", script, "--config.x=1"], sweep.child_env(2, {}))
    assert runner(7, tmp_path / "seed7", [cores[1]]) == 0
    assert (tmp_path / "seed7" / "sweep.log").read_text().strip() == (
        f"['--config.x=1', '--config.seed=7', '--workdir={tmp_path / 'seed7'}'] [{cores[1]}]")
    assert sweep.child_env(2, {}) == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.450"} and sweep.child_env(1, {}) == {}


def test_config_arguments_are_passed_to_every_seed():
    argv = ["--config=configs/debate.py", "--seeds=0,1", "--config.rounds", "2", "--jobs=2",
            "--config.task.n_test=8", "--workdir", "runs/x", "--config.distill.remat", "--jobs=1"]
    assert sweep.config_args(argv) == ["--config=configs/debate.py", "--config.rounds", "2", "--config.task.n_test=8",
                                       "--config.distill.remat"]


def _sweep_cli(*args: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launch" / "sweep.py"), f"--config={REPO / 'configs/debate.py'}",
                           *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_sweep_launcher_reports_a_failing_seed_with_exit_status_1(tmp_path):
    run = _sweep_cli("--seeds=5", f"--workdir={tmp_path}", "--config.task.name=gsm8k",
                     "--config.task.data_root=/nonexistent/data", cwd=tmp_path)
    assert run.returncode == 1, run.stderr[-2000:]
    assert "seed 5: FAILED (exit 1)" in run.stdout and "seed 5 (exit 1" in (tmp_path / "sweep.md").read_text()
    assert "/nonexistent/data" in (tmp_path / "seed5" / "sweep.log").read_text()  # the seed's own error
    refused = _sweep_cli("--config.seed=3", cwd=tmp_path)
    assert refused.returncode == 1 and "--config.seed: the sweep sets each run's seed" in refused.stderr


# ---------------------------------------------------------------------------------------- compute-matched control


def test_budget_counts_the_generated_messages_about_the_items():
    task = get_task("synthetic", digits=1, steps=2, n_dev=2, n_test=2)
    (a, b), dev = task.test, task.dev[0]
    turns = [Turn(a.id, "m0", 1, "answer", [], "= 1", output_tokens=3)] * 5 + [Turn(b.id, "m1", 1, "answer", [], "= 2",
                                                                                output_tokens=2)] * 4
    turns += [Turn(dev.id, "m0", 0, "answer", [], "= 3", output_tokens=3)] * 50  # a router's fit on dev
    turns += [Turn(a.id, "m2", 2, "judge", [], "Yes")] * 9  # a likelihood judgment: no generated token
    assert collaboration_budget(turns, task.test) == 5  # 9 messages for 2 items, rounded up
    assert collaboration_budget([], task.test) == 1


def _scripted_pool(task, seeds=(0, 1, 2)) -> Pool:
    """m0: right on samples 0, 1 of every 3 (wrong ones all differ); m1: right on sample 0 only, else
    one shared wrong answer; m2: right on the even test items, always. Member i's weights: `seeds[i]`."""
    index = {ex.messages[0]["content"]: (k, int(ex.answer)) for k, ex in enumerate(task.test)}

    def reply(member: int, messages: list[dict], j: int) -> str:
        k, gold = index[messages[0]["content"]]
        right = (j % 3 != 2, j == 0, k % 2 == 0)[member]
        return f"= {gold if right else gold + (100 + j if member == 0 else 1)}"

    def backend(pool, members, prompts, params):
        backend.calls.append((len(members), params.n))
        return [[Completion(t, TOK.encode(t), [-0.1] * len(TOK.encode(t)), "stop") for t in
                 (reply(m, p, j) for j in range(params.n))] for m, p in zip(members, prompts)]

    backend.calls = []
    return Pool([Member(f"m{i}", create("tiny", seed=s), TOK) for i, s in enumerate(seeds)], backend=backend)


def test_control_votes_each_members_samples_on_the_collaborations_budget_and_is_stored(tmp_path):
    task = get_task("synthetic", digits=1, steps=2, n_dev=2, n_test=4)
    assert len({ex.messages[0]["content"] for ex in task.test}) == 4
    pool = _scripted_pool(task)
    strategy = make_strategy(ml_collections.ConfigDict(dict(name="debate", rounds=2)))  # 3 agents x 2 rounds
    evaluation = EvalSettings(temperature=0.0, max_new_tokens=8)
    store = RunStore(tmp_path)
    singles, multi, control = evaluate_round(strategy, pool, task, evaluation, 0, store, 0)
    assert singles == {"m0": 1.0, "m1": 1.0, "m2": 0.5}  # greedy: everyone's sample 0
    # by hand, 6 samples: m0 right 4 of 6 -> right; m1 right 1 of 6, wrong 5 the same -> wrong; m2 as greedy
    assert control["single"] == {"m0": 1.0, "m1": 0.0, "m2": 0.5} and control["best"] == 1.0
    turns = read_transcript(tmp_path / "transcripts" / "round0_test.jsonl")
    collaboration = [t for t in turns if t.role in ("answer", "debate")]
    assert control["samples"] == len(collaboration) / len(task.test) == 6
    assert pool._backend.calls[-1] == (3 * 4, 6)  # one call: every member and item, 6 samples each
    assert sum(t.role == "control" for t in turns) == 3 * 4 * 6
    assert control["collaboration_tokens_per_item"] == sum(t.output_tokens for t in collaboration) / 4
    calls = len(pool._backend.calls)
    assert evaluate_round(strategy, pool, task, evaluation, 0, store, 0) == (singles, multi, control)  # stored in the unit
    assert len(pool._backend.calls) == calls
    store.close()


def test_a_pool_of_copies_is_evaluated_and_controlled_once_per_distinct_model(tmp_path):
    task = get_task("synthetic", digits=1, steps=2, n_dev=2, n_test=4)
    pool = _scripted_pool(task, seeds=(0, 0, 2))  # m1 has m0's weights (a pretrained pool of copies)
    assert pool.first_copies() == [0, 0, 2]
    strategy = make_strategy(ml_collections.ConfigDict(dict(name="debate", rounds=2)))
    evaluation = EvalSettings(temperature=0.0, max_new_tokens=8)
    singles, _, control = evaluate_round(strategy, pool, task, evaluation, 0, RunStore(tmp_path), 0)
    singles_call, *_, control_call = pool._backend.calls
    assert singles_call == (2 * 4, 1) and control_call == (2 * 4, 6)  # m0 and m2 only
    assert singles == {"m0": 1.0, "m1": 1.0, "m2": 0.5}  # m1 is m0: its answers
    assert control["single"] == {"m0": 1.0, "m1": 1.0, "m2": 0.5}


def test_report_states_effect1_against_the_best_single_model_and_the_control(tmp_path):
    control = [{"samples": 9, "single": {"a": 0.55, "b": 0.6}, "best": 0.6, "collaboration_tokens_per_item": 81.0,
                "tokens_per_item": 79.5}, None]
    report.write_results(tmp_path, {"task": "t", "strategy": "s", "multi": [0.65, 0.7],
                                    "single": {"a": [0.25, 0.5], "b": [0.5, 0.5]}, "control": control})
    text = report.render(tmp_path).read_text()
    assert ("Effect 1 (round 0): the collaboration's 65.0 against the best single member's 50.0: +15.0 points; "
            "against the compute-matched control, the best member's majority of 9 samples per item (60.0): "
            "+5.0 points.") in text
    assert ("| round | a | b | single mean ± std | collaboration | control samples | a control | b control | "
            "best control | vs best single | vs best control |") in text
    assert "\n| 0 | 25.0 | 50.0 | 37.5 ± 12.5 | 65.0 | 9 | 55.0 | 60.0 | 60.0 | +15.0 | +5.0 |\n" in text
    # round 1 has no control (a run begun before it existed)
    assert "\n| 1 | 50.0 | 50.0 | 50.0 ± 0.0 | 70.0 | n/a | n/a | n/a | n/a | +20.0 | n/a |\n" in text
    assert "collaboration / one model's control: round 0: 81.0 / 79.5." in text
    assert sum(line.startswith("| ") for line in text.splitlines()) == 3  # one table: header and the rounds
