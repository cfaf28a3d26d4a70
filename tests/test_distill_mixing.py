"""Per-student training sets: multi-student KD mixing and AGORA group distillation."""

from agora_jax.distill.data import Example
from agora_jax.distill.mixing import (AgoraConfig, MemoryEntry, agora_datasets, elite_agents,
                                      multi_student_datasets, plateaued, validated)


def outputs(student: int, n: int) -> list[Example]:
    return [Example(f"q{j}", f"s{student}-a{j}") for j in range(n)]


def test_multi_student_mix():
    collab = [Example(f"q{j}", f"collab-{j}") for j in range(7)]
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
            mine_items, best_items_i = {e.prompt for e in mine}, {e.prompt for e in best}
            assert not mine_items & best_items_i  # complementary halves of the dev items
            assert best_items in (None, best_items_i)
            best_items = best_items_i
    # the best student sees each of its outputs once
    assert sorted(e.completion for e in sets[1][7:]) == sorted(e.completion for e in own[1])
    assert multi_student_datasets(collab, own, [0.2, 0.9, 0.5], seed=0) == sets
    assert multi_student_datasets(collab, own, [0.2, 0.9, 0.5], seed=1) != sets


def memory() -> list[MemoryEntry]:
    return [
        MemoryEntry("p1", "sol A", "a", 0.9), MemoryEntry("p1", "sol B", "b", 0.8),
        MemoryEntry("p1", " sol B ", "c", 0.6),  # duplicate text of b's, lower score: dropped
        MemoryEntry("p2", "sol C", "c", 1.0), MemoryEntry("p2", "bad", "b", 0.1),  # below threshold
        MemoryEntry("p3", "sol A3", "a", 0.7),  # only a solved p3
        MemoryEntry("p4", "sol D", "d", 0.9),
    ]


def test_validated_dedupes_and_thresholds():
    kept = validated(memory(), 0.5)
    assert {(e.problem, e.solution.strip(), e.author) for e in kept} == {
        ("p1", "sol A", "a"), ("p1", "sol B", "b"), ("p2", "sol C", "c"), ("p3", "sol A3", "a"), ("p4", "sol D", "d")}


def test_agora_mostly_peers():
    acc = {"a": 0.5, "b": 0.9, "c": 0.7, "d": 0.2}
    sets = agora_datasets(memory(), acc)
    a = {(e.prompt, e.completion) for e in sets["a"]}
    # a: every peer solution, plus its own p3 (no peer solved it), not its own p1 (b solved p1)
    assert a == {("p1", "sol B"), ("p2", "sol C"), ("p4", "sol D"), ("p3", "sol A3")}
    assert all(e.weight == 1.0 for e in sets["a"])
    b = {(e.prompt, e.completion) for e in sets["b"]}
    assert b == {("p1", "sol A"), ("p2", "sol C"), ("p3", "sol A3"), ("p4", "sol D")}
    no_own = agora_datasets(memory(), acc, AgoraConfig(own_fallback=False))
    assert ("p3", "sol A3") not in {(e.prompt, e.completion) for e in no_own["a"]}


def test_agora_elite_peer_learning():
    acc = {"a": 0.5, "b": 0.9, "c": 0.7, "d": 0.2}
    assert elite_agents(acc, 2) == {"b", "c"} and elite_agents(acc, 2, exclude="b") == {"c", "a"}
    drawn = agora_datasets(memory(), acc, AgoraConfig(elite_k=2, elite_mode="draw"))
    assert {e.completion for e in drawn["d"]} == {"sol B", "sol C", "sol D"}  # b's and c's, and its own p4
    assert {e.completion for e in drawn["b"]} == {"sol A", "sol C", "sol A3"}  # b's elite peers: c and a
    weighted = agora_datasets(memory(), acc, AgoraConfig(elite_k=2, elite_mode="weight", elite_weight=3.0))
    weights = {e.completion: e.weight for e in weighted["d"]}
    assert weights == {"sol A": 1.0, "sol A3": 1.0, "sol B": 3.0, "sol C": 3.0, "sol D": 1.0}


def test_plateau():
    assert not plateaued([0.1, 0.2, 0.3], patience=2)
    assert plateaued([0.1, 0.3, 0.3, 0.25], patience=2)
    assert not plateaued([0.1], patience=2)
