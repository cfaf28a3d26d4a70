"""The evolution loop through `launch/main.py`: results, reports, exact resume after SIGKILL, bad input."""

import importlib.util
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from agora_jax.evolution import report
from stored_outputs import assert_results_are_the_stored_outputs

REPO = pathlib.Path(__file__).resolve().parents[1]
# A few-minute version of the default: tiny members, few items, two rounds; members trained stacked (what
# accelerators run, and the harder resume: a kill between the members' saves) where the CPU default trains
# them one after another (the supervised resume case below)
SMALL = ["--config.rounds=2", "--config.task.n_dev=12", "--config.task.n_test=12", "--config.task.synthetic.n_train=200",
         "--config.pool.pretrain_steps=8", "--config.pool.preset=tiny", "--config.strategy.num_agents=3",
         "--config.distill.epochs=1", "--config.distill.stack_students=true"]


def _main(workdir: pathlib.Path, *extra: str, config: str = "configs/debate.py", sizes: list[str] = SMALL) -> list[str]:
    return [sys.executable, str(REPO / "launch" / "main.py"), f"--config={REPO / config}", f"--workdir={workdir}",
            *sizes, *extra]


def _run(workdir, *extra, config="configs/debate.py", sizes=SMALL) -> subprocess.CompletedProcess:
    return subprocess.run(_main(workdir, *extra, config=config, sizes=sizes), capture_output=True, text=True,
                          timeout=900, cwd=REPO)


# the tests comparing against one uninterrupted run share a pytest-xdist worker (the run is made once)
UNINTERRUPTED = pytest.mark.xdist_group("evolution_uninterrupted")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> pathlib.Path:
    workdir = tmp_path_factory.mktemp("uninterrupted")
    run = _run(workdir)
    assert run.returncode == 0, run.stderr[-3000:]
    return workdir


@pytest.mark.slow
@UNINTERRUPTED
def test_run_writes_results_report_plot_and_transcripts(uninterrupted):
    """Every number of results.json is the run's stored outputs re-graded, and report.md shows them."""
    results = json.loads((uninterrupted / "results.json").read_text())
    assert set(results["single"]) == {"m0", "m1", "m2"} and len(results["multi"]) == 3
    assert_results_are_the_stored_outputs(uninterrupted, "debate")
    assert (uninterrupted / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert {p.name for p in (uninterrupted / "transcripts").iterdir()} >= {
        f"round{r}_{split}.jsonl" for r in range(3) for split in ("dev", "test") if r or split == "test"}
    assert sorted(p.name for p in (uninterrupted / "generations").iterdir() if p.name.isdigit()) == ["0", "1", "2"]


def _passed(workdir: pathlib.Path, marker: str) -> bool:
    """The run in `workdir` got past `marker`: it exists, or it is a unit of a round already checkpointed
    (whose unit files are gone)."""
    parts = pathlib.PurePath(marker).parts
    return (workdir / marker).exists() or (parts[0] == "rounds" and (workdir / "generations" / parts[1]).exists())


def _kill_when(command: list[str], workdir: pathlib.Path, marker: str, delay: float = 0.0,
               timeout: float = 600) -> None:
    """Start the run, SIGKILL it `delay` seconds after `marker` (a path under workdir) appears (unless it
    ends first); nothing when the run got past the marker already (an earlier kill came later)."""
    if _passed(workdir, marker):
        return
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    deadline = time.time() + timeout
    while not (workdir / marker).exists():
        assert proc.poll() is None, f"run ended before {marker} appeared"
        assert time.time() < deadline, f"{marker} never appeared"
        time.sleep(0.05)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def _kill_at_random(command: list[str], workdir: pathlib.Path, like: pathlib.Path) -> str:
    """Start the run, SIGKILL it at a random moment of what is left: 0-2 s after a random one of the
    transcripts and generation checkpoints that the finished run `like` wrote as it went and this run
    has not written yet (so the moment follows the run's progress, however fast this machine or the
    compilation cache makes it); returns the moment."""
    ahead = sorted(str(p.relative_to(like)) for pattern in ("transcripts/*.jsonl", "generations/[0-9]*")
                   for p in like.glob(pattern) if not _passed(workdir, str(p.relative_to(like))))
    marker, delay = random.choice(ahead), random.uniform(0, 2)
    _kill_when(command, workdir, marker, delay)
    return f"{delay:.2f} s after {marker}"


def _assert_same_run(resumed: pathlib.Path, uninterrupted: pathlib.Path, *state: str, context: str = "") -> None:
    """Identical results.json, transcripts, generation records (incl. the distillation data) and `state` files."""
    names = ["results.json", *state, *(str(p.relative_to(uninterrupted)) for pattern in
                                       ("transcripts/*.jsonl", "generations/*/meta/metadata")
                                       for p in sorted(uninterrupted.glob(pattern)))]
    assert len(names) > 1 + len(state), names
    for name in names:
        assert (resumed / name).read_text() == (uninterrupted / name).read_text(), f"{name} differs {context}"


@pytest.mark.slow
@UNINTERRUPTED
def test_resume_after_sigkill_at_several_moments_gives_identical_results(uninterrupted, tmp_path):
    # while training the pool, after the round-1 collaboration, mid-distillation, after a generation, then at
    # a random moment of round 2
    command = _main(tmp_path)
    for marker in ("pool/m1", "rounds/1/collaboration.json", "rounds/1/members/m0", "generations/1"):
        _kill_when(command, tmp_path, marker)
    moment = _kill_at_random(command, tmp_path, uninterrupted)
    run = _run(tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    _assert_same_run(tmp_path, uninterrupted, context=f"(random kill {moment})")


# A distillation method and a filter per run, so that every method and every filter is resumed (the run above:
# multi_student, no filter): config, sizes, settings, kill markers (then a random kill), state files to compare.
AGORA_SMALL = [a for a in SMALL if not a.startswith("--config.strategy.")] + ["--config.strategy.samples=2"]
SEQUENTIAL = [a for a in SMALL if not a.startswith("--config.distill.stack_students")] + [
    "--config.distill.stack_students=false"]  # as the CPU default: one member after another
RESUMED = {
    "supervised-agreement": (  # 0.3: this tiny pool's debates keep most items (the fresh data is not empty)
        "configs/debate.py", SEQUENTIAL,
        ["--config.distill.method=supervised", "--config.distill.filter=agreement",
         "--config.distill.min_agreement=0.3"],
        ["rounds/1/collaboration.json"], []),
    "agora-logit-answered": (  # a kill inside round 1's collaboration, after its memory was written
        "configs/agora.py", AGORA_SMALL, ["--config.distill.method=logit", "--config.distill.filter=answered"],
        ["strategy/agora/memory.jsonl"],
        ["strategy/agora/memory.jsonl", "strategy/agora/state.json"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RESUMED))
def test_resume_after_sigkill_gives_identical_results_for_every_method_and_filter(name, tiny_pool, tmp_path):
    config, sizes, settings, markers, state = RESUMED[name]
    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    for workdir in (uninterrupted, resumed):  # the pool's training is resumed in the test above
        shutil.copytree(tiny_pool, workdir / "pool")
    run = _run(uninterrupted, *settings, config=config, sizes=sizes)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((uninterrupted / "generations/1/meta/metadata").read_text())["distill_data"]
    command = _main(resumed, *settings, config=config, sizes=sizes)
    for marker in markers:
        _kill_when(command, resumed, marker)
    moment = _kill_at_random(command, resumed, uninterrupted)
    run = _run(resumed, *settings, config=config, sizes=sizes)
    assert run.returncode == 0, run.stderr[-3000:]
    _assert_same_run(resumed, uninterrupted, *state, context=f"(random kill {moment})")


@pytest.mark.slow
@UNINTERRUPTED
def test_rerun_of_a_finished_run_changes_nothing(uninterrupted, tmp_path):
    """Also when the run was killed after its last generation's checkpoint, before its reports."""
    shutil.copytree(uninterrupted, tmp_path / "run")
    for name in ("results.json", "report.md"):
        (tmp_path / "run" / name).unlink()
    run = _run(tmp_path / "run")
    assert run.returncode == 0, run.stderr[-3000:]
    for name in ("results.json", "report.md"):
        assert (tmp_path / "run" / name).read_text() == (uninterrupted / name).read_text(), name


# ---------------------------------------------------------------------------------------- bad input


def test_unknown_config_key_is_refused(tmp_path):
    run = _run(tmp_path, "--config.distill.learning_rat=0.1")
    assert run.returncode != 0 and "learning_rat" in run.stderr
    assert not (tmp_path / "results.json").exists()


def test_unknown_distillation_method_is_refused(tmp_path):
    run = _run(tmp_path, "--config.distill.method=telepathy")
    assert run.returncode != 0 and "config.distill.method='telepathy'" in run.stderr
    assert not (tmp_path / "results.json").exists()


def test_wrong_type_is_refused(tmp_path):
    run = _run(tmp_path, "--config.rounds=three")
    assert run.returncode != 0 and "rounds" in run.stderr


def test_missing_data_file_is_named(tmp_path):
    run = _run(tmp_path, "--config.task.name=gsm8k", "--config.task.data_root=/nonexistent/data")
    assert run.returncode == 1, run.stderr[-2000:]
    assert "error:" in run.stderr and "/nonexistent/data" in run.stderr


def test_unwritable_workdir_is_named(tmp_path):
    (tmp_path / "a_file").write_text("")  # a directory cannot be made below a file, even as root
    run = _run(tmp_path / "a_file" / "run")
    assert run.returncode == 1 and "a_file/run is not writable" in run.stderr


def test_incompatible_workdir_is_refused_and_left_untouched(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"seed": 123}))
    run = _run(tmp_path)
    assert run.returncode == 1 and "different config" in run.stderr and "seed" in run.stderr
    assert json.loads((tmp_path / "config.json").read_text()) == {"seed": 123}


@pytest.mark.slow
@UNINTERRUPTED
def test_corrupt_checkpoint_is_reported(uninterrupted, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(uninterrupted, copy)
    for f in (copy / "generations" / "2" / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 100:
            f.write_bytes(b"\0" * 16)
    run = _run(copy, "--config.rounds=3")
    assert run.returncode == 1 and "cannot restore generation checkpoint" in run.stderr


# ---------------------------------------------------------------------------------------- reports


def test_report_renders_table_from_results(tmp_path):
    report.write_results(tmp_path, {"task": "t", "strategy": "s", "multi": [0.5, 0.75],
                                    "single": {"a": [0.25, 0.5], "b": [0.5, 0.5]}})
    report.render(tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "| 0 | 25.0 | 50.0 | 37.5 ± 12.5 | 50.0 |" in text
    assert "| 1 | 50.0 | 50.0 | 50.0 ± 0.0 | 75.0 |" in text
    run = subprocess.run([sys.executable, str(REPO / "launch" / "report.py"), str(tmp_path)], capture_output=True,
                         text=True)
    assert run.returncode == 0 and "37.5 ± 12.5" in run.stdout
    missing = subprocess.run([sys.executable, str(REPO / "launch" / "report.py"), str(tmp_path / "nope")],
                             capture_output=True, text=True)
    assert missing.returncode == 1 and "no results yet" in missing.stderr


def _load_config(name: str):
    spec = importlib.util.spec_from_file_location(f"agora_config_{name}", REPO / "configs" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(None)


def _build_pool(config, task, workdir):
    """`build_pool` with the settings `evolve` hands it for `config`."""
    from agora_jax.evolution.pool_builder import build_pool
    from agora_jax.evolution.settings import settings_of

    run = settings_of(config)
    return build_pool(run.pool, task, workdir, seed=run.seed, distill=run.distill, evaluation=run.evaluation,
                      engine=run.engine, mesh=run.mesh, strategy=config.strategy)


def _shrink(config) -> None:
    config.rounds = 1
    config.task.n_dev = config.task.n_test = 8
    config.task.synthetic.n_train = 200
    config.pool.preset = "tiny"
    config.pool.pretrain_steps = 8
    config.distill.epochs = 1


@pytest.fixture(scope="module")
def tiny_pool(tmp_path_factory) -> pathlib.Path:
    """One trained tiny pool (`workdir/pool`), copied into every strategy's run."""
    from agora_jax.evolution.config import make_task

    config = _load_config("debate.py")
    _shrink(config)
    config.pool.shared_init = True  # members trained from one initialisation: a base for dare_ties too
    workdir = tmp_path_factory.mktemp("tiny_pool")
    _build_pool(config, make_task(config.task), workdir)
    return workdir / "pool"


@pytest.fixture(scope="module")
def tiny_pool_params(tiny_pool) -> dict:
    """The parameters of each member of `tiny_pool` (every run's round-0 weights)."""
    from agora_jax.pool import params_of
    from agora_jax.models import load

    return {name: params_of(load(tiny_pool / name)[0]) for name in _load_config("debate.py").pool.models}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.py")))
def test_every_strategy_default_variant_runs_a_round(name, tiny_pool, tiny_pool_params, tmp_path):
    """Each `configs/<strategy>.py` default, at test size, round 0 and one evolution round end to end: its
    numbers are its stored outputs re-graded, and round 1 distilled every member (multi_student)."""
    import jax
    import numpy as np

    from agora_jax.evolution.loop import evolve
    from agora_jax.evolution.store import RunStore

    config = _load_config(name)
    _shrink(config)
    shutil.copytree(tiny_pool, tmp_path / "pool")
    results = evolve(config, tmp_path)
    assert results["strategy"] == config.strategy.name and len(results["multi"]) == 2
    assert_results_are_the_stored_outputs(tmp_path, config.strategy.name)
    before = tiny_pool_params
    assert set(before) == set(results["single"])
    store = RunStore(tmp_path, None)
    after, _ = store.restore_generation(1, before)
    store.close()
    for member in before:
        pairs = zip(jax.tree.leaves(before[member]), jax.tree.leaves(after[member]))
        assert any(np.any(np.asarray(a) != np.asarray(b)) for a, b in pairs), f"{member} was not distilled"


@pytest.mark.slow
def test_each_distillation_method_trains_every_member_its_own_way(tiny_pool, tmp_path):
    """`config.distill.method` reaches the loop: under each method every member's round-1 weights differ
    from its round-0 ones, and the three methods give three different results."""
    import jax
    import numpy as np

    from agora_jax.evolution.loop import evolve
    from agora_jax.evolution.store import RunStore
    from agora_jax.pool import params_of
    from agora_jax.models import load

    names = ("m0", "m1", "m2")
    before = {name: params_of(load(tiny_pool / name)[0]) for name in names}
    trained = {}
    for method in ("supervised", "multi_student", "logit"):
        config = _load_config("debate.py")
        _shrink(config)
        config.distill.method = method
        workdir = tmp_path / method
        shutil.copytree(tiny_pool, workdir / "pool")
        evolve(config, workdir)
        store = RunStore(workdir, None)
        after, _ = store.restore_generation(1, before)
        store.close()
        trained[method] = {name: [np.asarray(x) for x in jax.tree.leaves(after[name])] for name in names}
        for name in names:
            old = jax.tree.leaves(before[name])
            assert len(old) == len(trained[method][name]), name
            assert any(np.any(a != b) for a, b in zip(old, trained[method][name])), f"{method}: {name} unchanged"
    for a, b in [("supervised", "multi_student"), ("supervised", "logit"), ("multi_student", "logit")]:
        assert any(np.any(x != y) for x, y in zip(trained[a]["m0"], trained[b]["m0"])), f"{a} == {b}"


def test_agreement_filter_keeps_items_most_answers_agree_on():
    import dataclasses

    from agora_jax.evolution.distillation import distillation_data
    from agora_jax.evolution.settings import settings_of
    from agora_jax.strategies import DistillExample, Result, Turn
    from agora_jax.tasks import get_task

    task = get_task("synthetic", digits=1, steps=2, n_dev=2, n_test=1)
    first, second = task.dev
    wrong = lambda ex, k: str(int(ex.answer) + 1 + k)  # noqa: E731
    turns = [Turn(first.id, f"m{j % 3}", 1, "answer", [], f"= {first.answer if j < 6 else wrong(first, j)}")
             for j in range(9)]  # 6 of 9 agree
    turns += [Turn(second.id, f"m{j % 3}", 1, "answer", [], f"= {second.answer if j < 3 else wrong(second, j)}")
              for j in range(9)]  # 3 of 9 agree, the rest all differ
    turns += [Turn(second.id, "m0", 1, "judge", [], f"= {second.answer}")] * 9  # verdicts do not count
    turns += [Turn(second.id, "m0", 0, "answer", [], f"= {second.answer}")] * 9  # nor do earlier rounds
    turns += [Turn(first.id, "router", 1, "route", [], "m0")] * 6  # a router's choice is no answer either
    examples = [DistillExample(ex.id, ex.messages, f"= {ex.answer}") for ex in task.dev]
    collab = Result([e.completion for e in examples], turns, examples)
    settings = dataclasses.replace(settings_of(_load_config("debate.py")).distill, filter="agreement", min_agreement=0.5)
    assert [e.item_id for e in distillation_data(collab, task, settings)] == [first.id]
    settings = dataclasses.replace(settings, min_agreement=0.3)
    assert [e.item_id for e in distillation_data(collab, task, settings)] == [first.id, second.id]


def test_turn_roles_are_known_kinds_and_verdicts_are_marked():
    from agora_jax.strategies import Role, Turn

    assert Turn("a", "m0", 1, "answer", [], "= 1").role is Role.ANSWER and Role.ANSWER == "answer"
    assert [r.value for r in Role if r.is_verdict] == ["rank", "verify", "judge", "route"]
    with pytest.raises(ValueError, match="'critic' is not a valid Role"):
        Turn("a", "m0", 1, "critic", [], "")


def test_tensorboard_tags_keep_only_characters_tensorboard_accepts():
    assert report._tag("distill_loss/round1/smollm2-135m-instruct#2") == "distill_loss/round1/smollm2-135m-instruct_2"
    assert report._tag("test/single/Qwen2.5-7B Instruct") == "test/single/Qwen2.5-7B_Instruct"


def test_expert_slices_give_each_member_its_own_group_and_a_share_of_the_rest():
    from agora_jax.evolution.pool_builder import member_slice
    from agora_jax.tasks import get_task

    train = get_task("synthetic", digits=1, steps=2, ops="+-", n_train=600, n_dev=1, n_test=1).split("train")
    group = lambda k: int(train[k].messages[-1]["content"][0]) % 3  # noqa: E731 (first operand; ord("0") % 3 == 0)
    slices = [member_slice(train, i, 3, "expert", 0.1, seed=0) for i in range(3)]
    for i, rows in enumerate(slices):
        own = [k for k in rows if group(k) == i]
        assert len(own) == sum(group(k) == i for k in range(len(train)))  # the whole own group
        assert len(rows) - len(own) == int(0.1 * (len(train) - len(own)))  # 10% of the others
        assert len(set(rows.tolist())) == len(rows)
    random = [set(member_slice(train, i, 3, "random", 1 / 3, seed=0).tolist()) for i in range(3)]
    assert all(len(s) == 200 for s in random) and not (random[0] & random[1] or random[1] & random[2])
    # the groups are the task's: "What is 3 + 4 * 2?" belongs to the member of its first operand, 3
    chat = get_task("synthetic", digits=1, steps=2, ops="+-", n_train=600, n_dev=1, n_test=1, style="chat").split("train")
    assert chat[0].group == chat[0].question.split()[2]
    assert [member_slice(chat, i, 3, "expert", 0.1, seed=0).tolist() for i in range(3)] == [r.tolist() for r in slices]


def test_replay_draws_the_members_own_training_examples_and_needs_a_scratch_pool(tmp_path):
    from agora_jax.evolution.config import ConfigError, make_task
    from agora_jax.evolution.pool_builder import member_items, pretraining_examples, replay_examples
    from agora_jax.evolution.settings import settings_of

    config = _load_config("debate.py")
    with config.unlocked():
        config.task.synthetic.n_train, config.distill.replay = 300, 0.5
    task = make_task(config.task)
    run = settings_of(config)
    items = [member_items(run.pool, task, i, run.seed) for i in range(3)]
    own = [pretraining_examples(items[i]) for i in range(3)]
    drawn = replay_examples(items[1], 50, seed=7)
    assert len(drawn) == 50 and len({e.item_id for e in drawn}) == 50
    assert {e.item_id for e in drawn} <= {e.item_id for e in own[1]} and all(e.source == "replay" for e in drawn)
    assert not {e.item_id for e in drawn} & {e.item_id for e in own[0]} - {e.item_id for e in own[1]}
    assert [e.item_id for e in replay_examples(items[1], 50, seed=7)] == [e.item_id for e in drawn]
    assert [e.item_id for e in replay_examples(items[1], 50, seed=8)] != [e.item_id for e in drawn]
    assert len(replay_examples(items[1], 10**6, seed=7)) == len(own[1])  # at most all of them
    with config.unlocked():
        config.pool.kind = "pretrained"
    with pytest.raises(ConfigError, match="config.distill.replay=0.5.*pool.kind='scratch'"):
        _build_pool(config, task, tmp_path)  # at start-up, before any member is loaded


def test_pretraining_check_trains_further_a_member_that_did_not_fit_its_own_problems_and_keeps_the_best(
        tmp_path, monkeypatch):
    import json

    import jax

    from agora_jax.evolution import pool_builder
    from agora_jax.models import load
    from agora_jax.evolution.config import make_task
    from agora_jax.pool import params_of
    from agora_jax.evolution.settings import settings_of
    from agora_jax.pool.digest import params_digest

    config = _load_config("debate.py")
    with config.unlocked():
        config.task.synthetic.n_train, config.pool.preset, config.pool.models = 200, "tiny", ("m0", "m1")
        config.task.n_dev = config.task.n_test = 4
        config.pool.pretrain_check = 0.8
        config.distill.stack_students = True
    assert config.pool.pretrain_attempts == 3
    task = make_task(config.task)
    run = settings_of(config)
    untrained = pool_builder._initial_model(run.pool, 0)
    own = [pool_builder.member_items(run.pool, task, i, run.seed) for i in range(2)]
    assert pool_builder.own_fit(untrained, pool_builder.tiny_tokenizer(), own[0], 32) == 0.0
    # attempt 1 trains m0 and m1 stacked; m0 never fits 80%: two more attempts alone, each continuing
    # from where the last stopped; its second attempt (fit 0.6) is kept
    fits = [0.3, 0.9, 0.6, 0.5]
    checked = []  # the items each check asked
    trained = []  # (member, seed, digest of the weights it started from, of those it ended with, stacked with)

    def step(params):  # a fake training: every weight + 1
        return jax.tree.map(lambda a: a + 1, params)

    def pretrain(model, tokenizer, examples, settings, seed, progress, steps):
        assert steps == config.pool.pretrain_steps and not hasattr(settings, "steps")
        params = step(params_of(model))
        trained.append((progress.split()[1], seed, params_digest(params_of(model)), params_digest(params), 1))
        return params, [2.0, 1.0]

    def pretrain_stacked(models, tokenizer, examples, settings, seeds, progress, steps):
        assert steps == config.pool.pretrain_steps and len(models) == len(examples) == len(seeds)
        names = progress.split()[1].split("+")
        params = [step(params_of(m)) for m in models]
        trained.extend((n, s, params_digest(params_of(m)), params_digest(p), len(models))
                       for n, m, s, p in zip(names, models, seeds, params))
        return params, [[2.0, 1.0] for _ in models]

    monkeypatch.setattr(pool_builder, "distill_member", pretrain)
    monkeypatch.setattr(pool_builder, "distill_members", pretrain_stacked)
    def own_fit(model, tokenizer, items, max_new_tokens):
        checked.append([ex.id for ex in items])
        return fits.pop(0)

    monkeypatch.setattr(pool_builder, "own_fit", own_fit)
    pool = _build_pool(config, task, tmp_path)
    assert [(m, s, n) for m, s, _, _, n in trained] == [("m0", 0, 2), ("m1", 1, 2), ("m0", 100, 1), ("m0", 200, 1)]
    assert trained[0][2] == params_digest(params_of(untrained))  # attempt 1 from the initialisation
    assert trained[2][2] == trained[0][3] and trained[3][2] == trained[2][3]  # a retry continues the last attempt
    assert checked == [[ex.id for ex in own[i]] for i in (0, 1, 0, 0)]  # each member on its own problems
    assert params_digest(params_of(pool[0].model)) == trained[2][3]  # the best attempt is the member
    assert params_digest(params_of(load(tmp_path / "pool" / "m0")[0])) == trained[2][3]  # and is what was saved
    record = json.loads((tmp_path / "pool" / "m0" / "pretraining.json").read_text())
    assert record == {"check": 0.8, "attempts": [{"seed": 0, "fit": 0.3, "final_loss": 1.0},
                                                 {"seed": 100, "fit": 0.6, "final_loss": 1.0},
                                                 {"seed": 200, "fit": 0.5, "final_loss": 1.0}]}
    assert [a["fit"] for a in json.loads((tmp_path / "pool" / "m1" / "pretraining.json").read_text())["attempts"]] == [0.9]
