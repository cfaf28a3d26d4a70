"""Weight- and logit-level strategies: DARE/TIES on hand-built tensors, PSO on known optima, weight
averaging and logit fusion identities, and the strategies end to end on a pool of tiny models."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from agora_jax.models import create, tiny_tokenizer
from agora_jax.sampling import SamplingParams
from agora_jax.strategies.dare_ties import DareTies
from agora_jax.strategies.logit_fusion import LogitFusion
from agora_jax.strategies.merging import dare_drop, dare_ties, param_tree, weighted_mean, with_params
from agora_jax.strategies.pool import Member, Pool
from agora_jax.strategies.pso import pso_minimize
from agora_jax.strategies.weight_average import WeightAverage
from agora_jax.tasks import get_task

# Three task vectors of length 6 (no ties in magnitude inside a vector).
TAUS = np.array([[1.0, -2.0, 3.0, -0.5, 0.1, 4.0],
                 [2.0, 1.0, -1.2, -3.0, 0.2, -0.3],
                 [-0.5, -1.5, 2.0, 1.0, -4.0, 0.4]], np.float32)
BASE = np.array([1.0, -1.0, 0.5, 0.0, 2.0, -3.0], np.float32)


def _ties(weights, density=0.5, scale=1.0):
    trees = [{"w": jnp.asarray(BASE + t)} for t in TAUS]
    merged = dare_ties(trees, {"w": jnp.asarray(BASE)}, weights, drop_p=0.0, density=density, scale=scale)
    return np.asarray(merged["w"])


def test_ties_trim_elect_disjoint_mean_by_hand():
    # Top 3 of 6 by magnitude: t1 -> [0,-2,3,0,0,4], t2 -> [2,0,-1.2,-3,0,0], t3 -> [0,-1.5,2,0,-4,0].
    # Elected signs of the sums (2, -3.5, 3.8, -3, -4, 4): + - + - - +.
    # Disjoint means: 2 | (-2-1.5)/2 | (3+2)/2 (t2's -1.2 disagrees) | -3 | -4 | 4.
    np.testing.assert_array_equal(_ties(None), BASE + np.array([2.0, -1.75, 2.5, -3.0, -4.0, 4.0], np.float32))
    np.testing.assert_array_equal(_ties(None, scale=0.5), BASE + 0.5 * np.array([2.0, -1.75, 2.5, -3.0, -4.0, 4.0]))


def test_ties_weights_enter_sign_election_and_mean():
    # Weights (1, 5, 1): entry 2's weighted sum is 3 - 6 + 2 < 0, so t2's -1.2 wins it alone;
    # entry 1 keeps (-2*1 - 1.5*1) / (1 + 1). Only ratios matter: (0.1, 0.5, 0.1) is the same merge.
    expected = BASE + np.array([2.0, -1.75, -1.2, -3.0, -4.0, 4.0], np.float32)
    np.testing.assert_allclose(_ties([1.0, 5.0, 1.0]), expected, rtol=1e-6)
    np.testing.assert_allclose(_ties([0.1, 0.5, 0.1]), expected, rtol=1e-6)
    np.testing.assert_array_equal(_ties([0.0, 0.0, 0.0]), BASE)  # no weight: the base


def test_ties_without_trim_keeps_every_agreeing_entry():
    # density 1: entry 0 signs (+1, +2, -0.5) -> +, mean (1 + 2) / 2; entry 4 (0.1, 0.2, -4) -> -, -4.
    merged = _ties(None, density=1.0) - BASE
    np.testing.assert_allclose(merged[[0, 4]], [1.5, -4.0], rtol=1e-6)


def test_dare_drops_about_p_and_rescales_exactly():
    x = jax.random.normal(jax.random.key(1), (20000,))
    y = np.asarray(dare_drop(x, jax.random.key(7), 0.5))
    kept = y != 0
    assert abs(kept.mean() - 0.5) < 0.02
    np.testing.assert_array_equal(y[kept], np.asarray(x)[kept] * 2.0)  # survivors: exactly x / (1 - p)
    np.testing.assert_array_equal(y, np.asarray(dare_drop(x, jax.random.key(7), 0.5)))  # fixed seed: same mask
    assert (np.asarray(dare_drop(x, jax.random.key(8), 0.5)) != y).any()
    ones = np.asarray(dare_drop(jnp.ones(100_000), jax.random.key(0), 0.5))
    assert abs(ones.mean() - 1.0) < 0.015  # expectation preserved (std of the mean 0.003)
    np.testing.assert_array_equal(np.asarray(dare_drop(x, jax.random.key(0), 0.0)), np.asarray(x))


def test_dare_ties_uses_one_dare_mask_per_model_and_tensor():
    key = jax.random.key(3)
    trees = [{"a": jnp.asarray(BASE + t), "b": jnp.asarray(2 * t)} for t in TAUS]
    base = {"a": jnp.asarray(BASE), "b": jnp.zeros(6)}
    merged = dare_ties(trees, base, None, drop_p=0.5, density=1.0, key=key)
    # Same result from DARE applied by hand (leaf j, model i -> fold_in(fold_in(key, j), i)), then TIES.
    dropped = [{"a": BASE + dare_drop(jnp.asarray(t), jax.random.fold_in(jax.random.fold_in(key, 0), i), 0.5),
                "b": dare_drop(jnp.asarray(2 * t), jax.random.fold_in(jax.random.fold_in(key, 1), i), 0.5)}
               for i, t in enumerate(TAUS)]
    by_hand = dare_ties(dropped, base, None, drop_p=0.0, density=1.0)
    for name in ("a", "b"):
        np.testing.assert_allclose(np.asarray(merged[name]), np.asarray(by_hand[name]), rtol=1e-6, atol=1e-6)


def test_merge_rejects_mismatched_models():
    with pytest.raises(ValueError, match="different parameter structure"):
        weighted_mean([{"w": jnp.zeros(3)}, {"w": jnp.zeros(4)}])


def test_pso_finds_shifted_sphere_and_rosenbrock():
    center = np.array([0.3, -1.2, 2.5])
    x, fx, history = pso_minimize(lambda x: float(np.sum((x - center) ** 2)), 3, (-5.0, 5.0), n_particles=20,
                                  iters=100, seed=0)
    assert np.abs(x - center).max() < 1e-3 and fx < 1e-6
    assert [h.best_f for h in history] == sorted((h.best_f for h in history), reverse=True)  # never worse
    rosenbrock = lambda p: float((1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2)  # noqa: E731
    x, _, _ = pso_minimize(rosenbrock, 2, (-2.0, 2.0), n_particles=30, iters=200, seed=0)
    assert np.abs(x - 1.0).max() < 1e-2
    again, _, _ = pso_minimize(rosenbrock, 2, (-2.0, 2.0), n_particles=30, iters=200, seed=0)
    np.testing.assert_array_equal(x, again)


def test_pso_respects_bounds_and_init():
    x, fx, history = pso_minimize(lambda x: float(-x.sum()), 2, ([0.0, 0.0], [1.0, 2.0]), n_particles=4, iters=20)
    np.testing.assert_allclose(x, [1.0, 2.0])  # the optimum sits on the box corner
    _, fx, history = pso_minimize(lambda x: 0.0 if np.allclose(x, 0.5) else 1.0, 2, (0, 1), 4, 0, init=[[0.5, 0.5]])
    assert fx == 0.0 and history[0].n_evaluations == 4


def test_with_params_makes_new_containers():
    model = create("tiny", seed=0)
    params = param_tree(model)
    copy = with_params(model, params)
    nnx.update(copy, jax.tree.map(jnp.zeros_like, params))
    assert float(jnp.abs(model.embed[...]).sum()) > 0 and float(jnp.abs(copy.embed[...]).sum()) == 0


# ---------------------------------------------------------------------- tiny pools, real engine

MAX_NEW = 8
GREEDY = dict(temperature=0.0, max_new_tokens=MAX_NEW)
SAMPLED = dict(temperature=0.7, top_p=0.9, max_new_tokens=MAX_NEW)


@pytest.fixture(scope="module")
def tiny_task():
    return get_task("synthetic", digits=1, steps=1, n_dev=4, n_test=3, n_train=0)


def _pool(seeds):
    tokenizer = tiny_tokenizer()
    return Pool([Member(f"m{i}", create("tiny", seed=s), tokenizer) for i, s in enumerate(seeds)])


@pytest.fixture(scope="module")
def pool3():
    return _pool([0, 1, 2])


@pytest.fixture(scope="module")
def copies():
    return _pool([5, 5, 5])


def test_weight_average_and_dare_ties_of_copies_are_the_model(copies):
    trees = [param_tree(m.model) for m in copies.members]
    ids = jnp.arange(1, 9)[None]
    reference = np.asarray(copies[0].model(ids))
    average = weighted_mean(trees)
    for a, b in zip(jax.tree.leaves(average), jax.tree.leaves(trees[0])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    merged = dare_ties(trees, average, drop_p=0.5, density=0.2, key=jax.random.key(0))  # task vectors all 0
    for params in (average, merged):
        np.testing.assert_allclose(np.asarray(with_params(copies[0].model, params)(ids)), reference, atol=1e-5)


def test_logit_fusion_of_copies_equals_the_model_greedy(copies, tiny_task):
    config = ml_collections.ConfigDict(dict(name="logit_fusion", weights=[0.2, 0.3, 0.5], sampling=GREEDY))
    result = LogitFusion(config).run(copies, tiny_task, "test", jax.random.key(0))
    alone = copies.generate([(0, it.messages) for it in tiny_task.test], SamplingParams(**GREEDY))
    assert [t.output for t in result.transcript] == [c[0].text for c in alone]
    assert [len(t.logprobs) for t in result.transcript] == [len(c[0].tokens) for c in alone]
    fused = copies.fused_generate([it.messages for it in tiny_task.test], SamplingParams(**GREEDY), [0.2, 0.3, 0.5])
    assert [c[0].tokens for c in fused] == [c[0].tokens for c in alone]  # token-identical
    assert all(t.role == "fuse" and t.model == "logit_fusion" for t in result.transcript)


def test_dare_ties_base_choice(pool3):
    member = DareTies(ml_collections.ConfigDict(dict(base_member=1))).base(pool3)
    assert all(a is b for a, b in zip(jax.tree.leaves(member), jax.tree.leaves(param_tree(pool3[1].model))))
    mean = DareTies(ml_collections.ConfigDict()).base(pool3)  # default: the elementwise mean of the pool
    expected = sum(np.asarray(m.model.embed[...]) for m in pool3.members) / 3
    np.testing.assert_allclose(np.asarray(mean["embed"][...]), expected, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="not both"):
        DareTies(ml_collections.ConfigDict(dict(base_member=0, base_path="/x"))).base(pool3)
    with pytest.raises(ValueError, match="mode"):
        DareTies(ml_collections.ConfigDict(dict(mode="best")))


@pytest.mark.parametrize("cls,extra", [
    (WeightAverage, {}),
    (LogitFusion, {}),
    (DareTies, {"mode": "average"}),
    (DareTies, {"mode": "optimized", "pso": {"n_particles": 3, "iters": 1}}),
])
def test_strategy_end_to_end_is_deterministic(cls, extra, pool3, tiny_task, tmp_path):
    strategy = cls(ml_collections.ConfigDict(dict(name=cls.name, sampling=SAMPLED, **extra)), tmp_path)
    a, b = (strategy.run(pool3, tiny_task, "test", jax.random.key(11)) for _ in range(2))
    assert len(a.answers) == len(tiny_task.test) and a.answers == b.answers
    assert a.answers != strategy.run(pool3, tiny_task, "test", jax.random.key(12)).answers  # the rng matters
    assert [e.completion for e in a.examples] == a.answers and all(e.targets is None for e in a.examples)
    final = [t for t in a.transcript if t.round == 1]
    assert [t.item_id for t in final] == [it.id for it in tiny_task.test]
    assert all(t.prompt_tokens > 0 and 0 < t.output_tokens <= MAX_NEW and len(t.logprobs) == t.output_tokens
               for t in final)
    if extra.get("mode") == "optimized":  # fit once on dev, then read from this generation's cache
        assert a.info["pso"]["cached"] is False and b.info["pso"]["cached"] is True
        assert b.info["weights"] == a.info["weights"] and len(a.info["weights"]) == 3
        assert (tmp_path / "strategy" / "dare_ties" / "gen0" / "merge_weights.json").exists()
