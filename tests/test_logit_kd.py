"""Logit KD distills the collaboration (docs/method.md §1, method 3): the strategy's own examples, each
member only those addressed to it, toward the model that produced each one (the fused pool, one member,
a model the strategy built)."""

import dataclasses
import functools

import jax
import ml_collections
import numpy as np
import pytest

from agora_jax.distill.data import collate, tokenize
from agora_jax.distill.stacked import teacher_pool
from agora_jax.distill.trainer import DistillConfig, Trainer, objective
from agora_jax.evolution.config import ConfigError, base_config
from agora_jax.evolution.distillation import distill_pool_logits, strategy_teachers
from agora_jax.evolution.loop import distill_pool
from agora_jax.evolution.settings import settings_of
from agora_jax.evolution.store import RunStore
from agora_jax.pool import Member, Pool, params_of
from agora_jax.models import create, tiny_tokenizer
from agora_jax.strategies import DistillExample, Turn
from agora_jax.strategies.base import final_result, single_answer_result
from agora_jax.tasks import Example as TaskExample
from agora_jax.records import pair

NAMES = ("m0", "m1", "m2")


def config(**logit) -> ml_collections.ConfigDict:
    c = base_config(None, ml_collections.ConfigDict({"name": "debate"}))
    c.distill.update(method="logit", batch_size=4, epochs=12, learning_rate=1e-2, warmup_ratio=0.0, lora_rank=0, max_len=64,
                     buckets=(64,), remat=False)
    c.distill.logit.update(logit)
    return c


def tiny(seed: int, sharp: bool = False):
    """A tiny model; `sharp`: embeddings x8, a peaked distribution far from an untrained model's."""
    model = create("tiny", seed=seed)
    if sharp:
        model.embed[...] = model.embed[...] * 8.0
    return model


def pool(sharp: tuple[str, ...] = ()) -> Pool:
    tok = tiny_tokenizer()
    return Pool([Member(name, tiny(i, name in sharp), tok) for i, name in enumerate(NAMES)])


def examples(answers: str = "7391", teacher: str | None = None, targets=None) -> list[DistillExample]:
    """Question k (the same prompts for any `answers`), answered with `answers[k]`."""
    return [DistillExample(f"q{k}", [{"role": "user", "content": f"what is {k} + 3?"}], f"The answer is {a}.",
                           targets=targets, teacher=teacher) for k, a in enumerate(answers)]


def leaves(p: Pool) -> dict[str, list[np.ndarray]]:
    return {m.name: [np.asarray(x) for x in jax.tree.leaves(params_of(m.model))] for m in p.members}


class Board:
    """Records the loss curves the loop reports (in place of the TensorBoard writer)."""

    def __init__(self):
        self.tags: dict[str, list[float]] = {}

    def losses(self, tag: str, values: list[float]) -> None:
        self.tags[tag] = values


class Merger:
    """A stand-in for a weight-level strategy: its examples name `name`; its model, rebuilt from
    `info`, is the sharpened tiny model of that seed."""

    name = "merger"

    def teacher_model(self, p: Pool, info: dict):
        return tiny(info["seed"], sharp=True)


def run_loop(p: Pool, exs: list[DistillExample], tmp_path, c=None) -> Board:
    """`loop.distill_pool` with `distill.method=logit` on these examples (round 1)."""
    board, store, run = Board(), RunStore(tmp_path, None), settings_of(c or config())
    distill_pool(p, None, [dataclasses.asdict(e) for e in exs], store, 1, board, Merger(), {"seed": 1},
                 distill=run.distill, evaluation=run.evaluation, slices=run.pool, seed=run.seed)
    store.close()
    return board


def test_two_collaborations_with_different_outputs_give_different_students(tmp_path):
    """Same prompts, other completions: the students differ (logit KD used to ignore the examples)."""
    a, b = pool(), pool()
    run_loop(a, examples("7391"), tmp_path / "a")
    run_loop(b, examples("2468"), tmp_path / "b")
    for name in NAMES:
        assert any(np.any(x != y) for x, y in zip(leaves(a)[name], leaves(b)[name])), name


def test_targets_reach_only_their_members(tmp_path):
    """m0's examples reach m0 only, m1's m1 only; m2, addressed by none, ends exactly as it began, and
    m0 trains exactly as it would were its examples the only ones (zero-weight padding, no repeats)."""
    start = leaves(pool())
    both, alone = pool(), pool()
    board = run_loop(both, examples("7391", targets=("m0",)) + examples("24", targets=("m1",)), tmp_path / "both")
    run_loop(alone, examples("7391", targets=("m0",)), tmp_path / "alone")
    after, only_m0 = leaves(both), leaves(alone)
    for x, y in zip(after["m2"], start["m2"]):
        np.testing.assert_array_equal(x, y)
    assert any(np.any(x != y) for x, y in zip(after["m1"], start["m1"]))
    for x, y in zip(after["m0"], only_m0["m0"]):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)
    # m1's 2 examples fill 12 steps of one batch, half-empty; m0 takes 12 steps, m2 none
    assert [len(board.tags[f"distill_loss/round1/{n}"]) for n in NAMES] == [12, 12, 0]


def test_kl_is_zero_for_the_producing_member_and_falls_for_the_others():
    """Examples produced by m0 (a router's choice): m0 starts as its own teacher (KL 0, to rounding);
    m1 and m2 move toward m0's distribution on the completions."""
    p = pool(sharp=("m0",))
    exs = examples("7391", teacher="m0")
    _, losses = distill_pool_logits(p.members, [exs] * 3, {}, settings_of(config()).distill, seed=0, max_new_tokens=8)
    assert abs(losses[0][0]) < 1e-6
    for student in losses[1:]:
        assert student[0] > 0.5 and np.mean(student[-2:]) < 0.5 * student[0], student


def test_producing_member_teacher_is_that_members_distribution():
    """A row whose teacher weights pick member k of the teacher pool has member k's distribution as its
    target (the same loss as a pool of k alone), not the fused pool's."""
    tok = tiny_tokenizer()
    members = [create("tiny", seed=s) for s in (4, 5)]
    cfg = DistillConfig(lora=None, objective="kd", remat=False, loss_chunk=32)
    trainer = Trainer(create("tiny", seed=0), cfg, 1)
    records = [tokenize(tok, pair(e.messages, e.completion), 64) for e in examples("739")]
    batch = {k: jax.numpy.asarray(v) for k, v in collate(records, np.arange(3), 64, tok.pad_id).items()}

    kd = jax.jit(functools.partial(objective, graphdef=trainer.graphdef, cfg=cfg))

    def loss(teachers, weights=None):
        b = batch if weights is None else {**batch, "teacher_weights": jax.numpy.asarray(weights, np.float32)}
        return float(kd(trainer.state.params, trainer.frozen, b, teacher_pool(teachers), None)[0])

    np.testing.assert_allclose(loss(members, [[0.0, 1.0]] * 3), loss(members[1:]), rtol=1e-6)
    assert abs(loss(members, [[0.0, 1.0]] * 3) - loss(members, [[0.5, 0.5]] * 3)) > 1e-3


def test_a_model_the_strategy_built_is_the_teacher_of_its_examples():
    """dare_ties-like examples name the strategy; `strategy_teachers` rebuilds its model from `info`.
    Built here as m1's twin: m1 has KL 0 toward it, m0 does not. Unknown teachers are refused."""
    p = pool(sharp=("m1",))
    exs = examples("7391", teacher="merger")
    built = strategy_teachers(Merger(), p, {"seed": 1}, exs)
    _, losses = distill_pool_logits(p.members, [exs] * 3, built, settings_of(config()).distill, seed=0,
                                    max_new_tokens=8)
    assert abs(losses[1][0]) < 1e-6 and losses[0][0] > 0.5
    with pytest.raises(ValueError, match="'nobody'"):
        strategy_teachers(Merger(), p, {}, examples("1", teacher="nobody"))
    with pytest.raises(ConfigError, match="config.distill.logit.source='psychic'"):
        distill_pool_logits(p.members, [exs] * 3, built, settings_of(config(source="psychic")).distill, seed=0,
                            max_new_tokens=8)


def test_results_record_who_produced_each_example():
    """Routers' outputs name the member that answered; logit fusion's the fused pool; a refine writer is
    named for all its examples."""
    items = [TaskExample(f"q{k}", f"question {k}", [{"role": "user", "content": f"question {k}"}], "1", "number")
             for k in range(2)]
    finals = [Turn(it.id, name, 1, "answer", list(it.messages), "1") for it, name in zip(items, ("m1", "m0"))]
    assert [e.teacher for e in single_answer_result("router", items, finals, finals, {}).examples] == ["m1", "m0"]
    assert [e.teacher for e in single_answer_result("fusion", items, finals, finals, {}, fused=True).examples] == [
        None, None]
    assert [e.teacher for e in final_result(items, ["1", "2"], [], teachers="m2").examples] == ["m2", "m2"]
    assert [e.teacher for e in final_result(items, ["1", "2"], []).examples] == [None, None]


@pytest.mark.slow
def test_student_samples_on_its_own_example_prompts_in_one_program(tmp_path):
    """`distill.logit.source=student`: each student samples its own examples' prompts and learns the
    fused pool's distribution on them in one jitted program; a member addressed by none stays unchanged."""
    p = pool()
    start = leaves(p)
    c = config(source="student")
    c.distill.epochs = 2
    board = run_loop(p, examples("7391", targets=("m0",)) + examples("24", targets=("m1",)), tmp_path, c)
    after = leaves(p)
    for x, y in zip(after["m2"], start["m2"]):
        np.testing.assert_array_equal(x, y)
    for name in ("m0", "m1"):
        assert any(np.any(x != y) for x, y in zip(after[name], start[name])), name
    assert [len(board.tags[f"distill_loss/round1/{n}"]) for n in NAMES] == [2, 2, 0]
