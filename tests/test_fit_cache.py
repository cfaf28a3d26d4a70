"""Fits follow the weights: a strategy's cached fit (refine's writer, dare_ties' merge weights, a
router's cache key) is keyed by a digest of the members' current weights, so the test collaboration
after a distillation is fit with the distilled members, while unchanged members reuse the cache."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from agora_jax.pool import Member, Pool, load_params_into, params_digest, params_of
from agora_jax.models import create, load, save_hf, tiny_tokenizer
from agora_jax.sampling import Completion
from agora_jax.strategies import make_strategy
from agora_jax.strategies.base import fingerprint
from agora_jax.strategies.merging import param_tree, with_params
from agora_jax.pool.digest import _leaf_sums
from agora_jax.tasks import get_task

TOK = tiny_tokenizer()


@pytest.fixture(scope="module")
def task():
    return get_task("synthetic", digits=1, steps=1, n_dev=4, n_test=3, n_train=0)


def _members(seeds=(0, 1, 2)):
    return [Member(f"m{i}", create("tiny", seed=s), TOK) for i, s in enumerate(seeds)]


def _distill(member: Member, seed: int, scale: float = 1e-3) -> None:
    """Stands in for distilling `member`: new weights written in place, as the loop does."""
    params = params_of(member.model)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    load_params_into(member.model, jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape, x.dtype)
                                                                for x, k in zip(leaves, keys)]))


def test_leaf_checksums_are_the_position_weighted_sums_of_the_bits():
    x = np.random.default_rng(0).standard_normal((3, 5, 7)).astype(np.float32)
    bits, position = x.view(np.uint32).ravel().astype(np.uint64), np.arange(x.size, dtype=np.uint64)
    expected = [int(np.sum(bits * ((position * c) % 2**32 | 1)) % 2**32) for c in (2654435761, 0x85EBCA6B)]
    assert np.asarray(_leaf_sums(jnp.asarray(x))).tolist() == expected
    y = x.copy()
    y[2, 4, 6] = np.nextafter(y[2, 4, 6], np.float32(np.inf))  # one ulp of one element
    assert (np.asarray(_leaf_sums(jnp.asarray(y))) != expected).all()
    half = jnp.asarray(x, jnp.bfloat16)
    assert params_digest({"w": half}) != params_digest({"w": half.at[0, 0, 0].add(1)}) != params_digest({"w": x})


def test_weights_digest_and_fingerprint_follow_the_members_weights(task):
    pool = Pool(_members())
    digest, key = pool.weights_digest(), fingerprint(ml_collections.ConfigDict(dict(a=1)), task, task.dev, pool)
    assert Pool(_members()).weights_digest() == digest  # the weights, not the objects
    pool.update("m0", pool.params("m0"))  # the same weights again
    assert pool.weights_digest() == digest
    _distill(pool[2], seed=0)
    assert pool.weights_digest() != digest  # changed in place: a router's cache key changes with it
    assert fingerprint(ml_collections.ConfigDict(dict(a=1)), task, task.dev, pool) != key
    assert Pool(_members((0, 2, 1))).weights_digest() != Pool(_members()).weights_digest()  # who holds what


class Scripted:
    """A pool backend: member m answers every prompt with `answer_of(m, messages)`; records the prompts
    of every call."""

    def __init__(self, answer_of):
        self.answer_of, self.calls = answer_of, []

    def __call__(self, pool, members, prompts, params):
        self.calls.append(prompts)
        return [[Completion(t, TOK.encode(t), [0.0] * len(TOK.encode(t)), "stop")]
                for t in (self.answer_of(m, msgs) for m, msgs in zip(members, prompts))]


def test_refine_writer_is_refit_when_a_member_is_distilled(task, tmp_path):
    gold = {ex.messages[-1]["content"]: int(ex.answer) for ex in task.dev + task.test}
    right = {"member": 1}  # the member whose answers are right: it follows the weights below

    def answer_of(member, messages):
        question = next(m["content"] for m in messages if m["role"] == "user")  # the final prompt appends to it
        value = next(v for q, v in gold.items() if question.startswith(q))
        return f"\\boxed{{{value + (member != right['member'])}}}"

    backend = Scripted(answer_of)
    pool = Pool(_members(), backend=backend)
    strategy = make_strategy(ml_collections.ConfigDict(dict(name="multiagent_refine")), tmp_path)
    assert strategy.run(pool, task, "dev", jax.random.key(0)).info["final_member"] == "m1"
    n = len(backend.calls)
    assert strategy.run(pool, task, "test", jax.random.key(1)).info["final_member"] == "m1"
    assert len(backend.calls) == n + 3  # same weights: the dev fit is reused (2 refine rounds + the final answer)
    _distill(pool[2], seed=1)
    right["member"] = 2  # distillation made m2 the best member
    test = strategy.run(pool, task, "test", jax.random.key(1))
    assert test.info["final_member"] == "m2" and test.info["dev_accuracy"] == {"m0": 0.0, "m1": 0.0, "m2": 1.0}
    assert len(backend.calls) == n + 3 + 4  # + round 1 on dev, before the final answer
    assert {p[-1]["content"] for p in backend.calls[-2]} == {ex.messages[-1]["content"] for ex in task.dev}


def test_dare_ties_merge_weights_are_refit_when_a_member_is_distilled(task, tmp_path):
    base_dir = save_hf(create("tiny", seed=9), tmp_path / "base", TOK)
    base = load(base_dir)[0]  # loaded, as a run's members are (and test_strategies_weights': one compiled merge)
    members = [Member(f"m{i}", with_params(base, param_tree(base)), TOK) for i in range(3)]
    for i, member in enumerate(members):
        _distill(member, seed=10 + i, scale=0.05)
    pool = Pool(members, base=str(base_dir))
    config = ml_collections.ConfigDict(dict(name="dare_ties", mode="optimized", pso=dict(n_particles=2, iters=0),
                                            sampling=dict(temperature=0.7, max_new_tokens=8)))
    strategy = make_strategy(config, tmp_path)
    fit = tmp_path / "strategy" / "dare_ties" / "gen0" / "merge_weights.json"
    runs = [strategy.run(pool, task, "test", jax.random.key(0))]
    saved = json.loads(fit.read_text())
    runs.append(strategy.run(pool, task, "test", jax.random.key(0)))
    assert json.loads(fit.read_text()) == saved  # unchanged members: the fit is read back
    _distill(pool[0], seed=2)
    runs.append(strategy.run(pool, task, "test", jax.random.key(0)))
    assert [r.info["pso"]["cached"] for r in runs] == [False, True, False]
    assert json.loads(fit.read_text())["fingerprint"] != saved["fingerprint"]
