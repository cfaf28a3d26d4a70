"""Per-student training sets: multi-student KD mixing, and AGORA's elite-peer learning in both modes."""

import types

import ml_collections
import pytest

from agora_jax.distill.mixing import multi_student_datasets
from agora_jax.evolution.config import ConfigError
from agora_jax.strategies import make_strategy
from agora_jax.strategies.agora import Memory
from agora_jax.records import DistillExample, pair


def outputs(student: int, n: int) -> list[DistillExample]:
    return [pair(f"q{j}", f"s{student}-a{j}") for j in range(n)]


def test_multi_student_mix():
    collab = [pair(f"q{j}", f"collab-{j}") for j in range(7)]
    own = [outputs(i, 7) for i in range(3)]
    sets = multi_student_datasets(collab, own, dev_scores=[0.2, 0.9, 0.5], seed=0)
    assert len(sets) == 3
    best_items = None
    for i, s in enumerate(sets):
        assert s[:7] == collab
        mine = [e for e in s[7:] if e.completion.startswith(f"s{i}-")]
        best = [e for e in s[7:] if e.completion.startswith("s1-")]
        assert len(s) == 7 + 4 + 3  # half of 7 (rounded up) own + the other half from the best
        if i != 1:
            assert len(mine) == 4 and len(best) == 3
            mine_items = {e.messages[0]["content"] for e in mine}
            best_items_i = {e.messages[0]["content"] for e in best}
            assert not mine_items & best_items_i  # complementary halves of the dev items
            assert best_items in (None, best_items_i)
            best_items = best_items_i
    # the best student sees each of its outputs once
    assert sorted(e.completion for e in sets[1][7:]) == sorted(e.completion for e in own[1])
    assert multi_student_datasets(collab, own, [0.2, 0.9, 0.5], seed=0) == sets
    assert multi_student_datasets(collab, own, [0.2, 0.9, 0.5], seed=1) != sets


# ---------------------------------------------------------------------- AGORA elite-peer learning

POOL = types.SimpleNamespace(names=["m0", "m1", "m2"])


def agora_data(elite, **settings) -> dict[tuple[str, str], tuple[tuple[str, ...] | None, float]]:
    """AGORA's training data from a planted memory: {(source, author's text): (targets, weight)}."""
    memory = Memory(None, "text", before=0)
    memory.add([{"item_id": f"q{i}", "messages": [{"role": "user", "content": f"q{i}"}],
                 "completion": f"{author} on q{i}", "answer": "1", "author": author, "generation": 0}
                for i, author in enumerate(["m0", "m1", "m2", "old"])])
    strategy = make_strategy(ml_collections.ConfigDict(dict(name="agora", **settings)))
    examples = strategy.examples(POOL, memory, {"q0", "q1", "q2", "q3"}, elite)
    return {(e.source, e.completion.split()[0]): (e.targets, e.weight) for e in examples}


def test_agora_elite_weight_mode_weights_the_top_agents_and_keeps_the_rest():
    weighted = agora_data(["m0", "m1"], elite_mode="weight", elite_weight=3.0, self_weight=0.5)
    assert weighted == {
        ("agora/peer", "m0"): (("m1", "m2"), 3.0), ("agora/self", "m0"): (("m0",), 1.5),
        ("agora/peer", "m1"): (("m0", "m2"), 3.0), ("agora/self", "m1"): (("m1",), 1.5),
        ("agora/peer", "m2"): (("m0", "m1"), 1.0), ("agora/self", "m2"): (("m2",), 0.5),
        ("agora/memory", "old"): (None, 1.0)}  # an author no longer in the pool: everyone's, unboosted


def test_agora_elite_draw_mode_keeps_only_the_top_agents_solutions():
    drawn = agora_data(["m0", "m1"], self_weight=0.5)  # the default mode
    assert drawn == {("agora/peer", "m0"): (("m1", "m2"), 1.0), ("agora/self", "m0"): (("m0",), 0.5),
                     ("agora/peer", "m1"): (("m0", "m2"), 1.0), ("agora/self", "m1"): (("m1",), 0.5)}
    # outside elite-peer learning both modes give every remembered solution at its plain weight
    assert agora_data(None, elite_mode="weight", elite_weight=3.0) == agora_data(None) == {
        **drawn, ("agora/peer", "m2"): (("m0", "m1"), 1.0), ("agora/self", "m2"): (("m2",), 0.5),
        ("agora/memory", "old"): (None, 1.0)}


@pytest.mark.parametrize("key,value", [("elite_mode", "top"), ("elite_weight", 0.0)])
def test_agora_refuses_bad_elite_settings(key, value):
    with pytest.raises(ConfigError, match=f"config.strategy.{key}="):
        make_strategy(ml_collections.ConfigDict({"name": "agora", key: value}))
