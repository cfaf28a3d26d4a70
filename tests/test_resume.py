"""A resume can never change a result: what a resumed round reads of a stored unit is what the fresh
round had (the collaboration with its transcript), and AGORA's shared memory, which lives outside the
generation checkpoints, is rebuilt exactly when a killed generation runs again. The SIGKILL tests of
whole runs are in test_evolution.py."""

import dataclasses
import json

import jax
import ml_collections
import pytest

from agora_jax.evolution.config import base_config
from agora_jax.evolution.distillation import distillation_data
from agora_jax.evolution.loop import collaborate
from agora_jax.evolution.settings import settings_of
from agora_jax.evolution.store import RunStore
from agora_jax.models import tiny_tokenizer
from agora_jax.sampling import Completion
from agora_jax.strategies import DistillExample, Result, Strategy, Turn, make_strategy
from agora_jax.pool import Member, Pool
from agora_jax.tasks import get_task

TOK = tiny_tokenizer()


@pytest.fixture(scope="module")
def task():
    return get_task("synthetic", digits=1, steps=2, n_dev=3, n_test=1)


class Planted(Strategy):
    """Returns a given collaboration; `result=None` fails if run (a resumed round must not re-run it)."""

    name = "planted"
    defaults = staticmethod(lambda: ml_collections.ConfigDict(dict(name="planted")))

    def __init__(self, result: Result | None):
        super().__init__(ml_collections.ConfigDict(dict(name="planted")))
        self.result = result

    def run(self, pool, task, split, rng) -> Result:
        assert self.result is not None, "a stored collaboration was run again"
        return self.result


def planted_collaboration(task) -> Result:
    """Three agents: all agree on dev item 0, two of three on item 1, none on item 2 (last round)."""
    said = [["3", "3", "3"], ["5", "5", "8"], ["1", "2", "4"]]
    turns = [Turn(ex.id, f"m{a}", 2, "answer", list(ex.messages), f"= {said[i][a]}", 25, 2, [-0.1 * a, -1 / 3])
             for i, ex in enumerate(task.dev) for a in range(3)]
    turns += [Turn(ex.id, f"m{a}", 1, "answer", list(ex.messages), "= 9", 25, 2, None)  # earlier rounds do not count
              for ex in task.dev for a in range(3)]
    examples = [DistillExample(ex.id, list(ex.messages), f"= {said[i][0]}", targets, source="planted")
                for (i, ex), targets in zip(enumerate(task.dev), [None, ("m1", "m2"), ()])]
    return Result([e.completion for e in examples], turns, examples, {"rates": {"m0": 0.5}, "steps": [1, 2]})


def test_a_stored_collaboration_is_the_fresh_one_field_for_field(task, tmp_path):
    fresh = planted_collaboration(task)
    store = RunStore(tmp_path)
    first = collaborate(Planted(fresh), None, task, 0, store, 1)
    store.close()
    store = RunStore(tmp_path)  # a new process after a kill: the unit is done, the strategy must not run
    resumed = collaborate(Planted(None), None, task, 0, store, 1)
    store.close()
    assert first == fresh and resumed == fresh  # answers, transcript, examples (targets too) and info
    distill = settings_of(base_config(None, ml_collections.ConfigDict(dict(name="debate")))).distill
    agreement = dataclasses.replace(distill, filter="agreement", min_agreement=0.6)
    kept = distillation_data(fresh, task, agreement)
    assert [e.item_id for e in kept] == [task.dev[0].id, task.dev[1].id]
    assert distillation_data(resumed, task, agreement) == kept


# ---------------------------------------------------------------------- AGORA's shared memory


def agora_pool(task, generation: int) -> Pool:
    """Three agents that answer every item right, worded by generation (so each generation adds new
    memory entries), and judges that say Yes to everything."""
    gold = {ex.messages[-1]["content"]: ex.answer for ex in task.dev}

    def backend(pool, members, prompts, params):
        out = []
        for messages in prompts:
            text = messages[-1]["content"]
            reply = "Yes" if "Is this solution correct?" in text else f"Answer {pool.generation}: {gold[text]}"
            out.append([Completion(reply, TOK.encode(reply), [-0.5] * len(TOK.encode(reply)), "stop")] * params.n)
        return out

    return Pool([Member(f"m{i}", None, TOK) for i in range(3)], generation, backend=backend)


def agora_generation(task, workdir, generation: int) -> Result:
    """AGORA's dev collaboration of one generation, in a fresh strategy object (as after a restart)."""
    strategy = make_strategy(ml_collections.ConfigDict(dict(name="agora", samples=1)), workdir)
    return strategy.run(agora_pool(task, generation), task, "dev", jax.random.key(generation))


def test_agora_rerun_of_a_killed_generation_starts_from_the_memory_before_it(task, tmp_path):
    uninterrupted = [agora_generation(task, tmp_path / "a", g) for g in (1, 2)]
    agora_generation(task, tmp_path / "b", 1)
    agora_generation(task, tmp_path / "b", 2)  # killed before its collaboration was stored ...
    resumed = agora_generation(task, tmp_path / "b", 2)  # ... so the resumed run does generation 2 again
    assert uninterrupted[1].info["new_in_memory"] == len(task.dev)
    assert resumed == uninterrupted[1]  # the same new entries, memory size, examples, dev history
    for name in ("memory.jsonl", "state.json"):
        assert (tmp_path / "b/strategy/agora" / name).read_text() == (tmp_path / "a/strategy/agora" / name).read_text()
    memory = [json.loads(line) for line in (tmp_path / "b/strategy/agora/memory.jsonl").read_text().splitlines()]
    assert [e["generation"] for e in memory] == [1] * len(task.dev) + [2] * len(task.dev)


def test_atomic_path_renames_on_success_and_leaves_the_old_file_on_failure(tmp_path):
    from agora_jax.atomic import atomic_path, atomic_write_text

    target = tmp_path / "results.json"
    atomic_write_text(target, "old")
    try:
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt  # a kill in the middle of writing
    except KeyboardInterrupt:
        pass
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    (tmp_path / "model.tmp").mkdir()  # a directory left by an earlier kill
    with atomic_path(tmp_path / "model") as tmp:
        tmp.mkdir()
        (tmp / "model.safetensors").write_text("weights")
    assert (tmp_path / "model" / "model.safetensors").read_text() == "weights"
    assert not (tmp_path / "model.tmp").exists()
