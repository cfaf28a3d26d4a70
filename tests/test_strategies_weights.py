"""Weight- and logit-level strategies: DARE/TIES on hand-built tensors, PSO on known optima, weight
averaging and logit fusion identities, dare_ties over the members' common base (planted skills), and
the strategies end to end on a pool of tiny models."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from agora_jax.evolution import pool_builder
from agora_jax.evolution.config import ConfigError
from agora_jax.evolution.settings import settings_of
from agora_jax.models import create, load, preset, save_hf, tiny_tokenizer
from agora_jax.sampling import SamplingParams
from agora_jax.strategies.dare_ties import DareTies
from agora_jax.strategies.logit_fusion import LogitFusion
from agora_jax.strategies.merging import dare_drop, dare_ties, param_tree, weighted_mean, with_params
from agora_jax.pool import Member, Pool, params_digest, params_of
from agora_jax.strategies.pso import pso_minimize
from agora_jax.strategies.weight_average import WeightAverage
from agora_jax.tasks import build_messages, get_task

REPO = pathlib.Path(__file__).resolve().parents[1]

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


def _perturbed(model, seed: int, scale: float = 0.05):
    """`model` plus seeded Gaussian noise on every parameter: a stand-in for a fine-tune of it."""
    params = param_tree(model)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return with_params(model, jax.tree.unflatten(treedef, noisy))


# The pools below hold loaded weights, as a run's pools do: loaded arrays are committed to their
# device, and jitted programs compile once per committed / uncommitted input, so one kind throughout
# compiles the merges and engines once for the module.


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A saved tiny model: the common base of `pool3`."""
    return save_hf(create("tiny", seed=9), tmp_path_factory.mktemp("base") / "base", tiny_tokenizer())


@pytest.fixture(scope="module")
def pool3(base_dir):
    base, tokenizer = load(base_dir)
    return Pool([Member(f"m{i}", _perturbed(base, i), tokenizer) for i in range(3)], base=str(base_dir))


@pytest.fixture(scope="module")
def copies(base_dir):
    base, tokenizer = load(base_dir)
    return Pool([Member(f"m{i}", with_params(base, param_tree(base)), tokenizer) for i in range(3)])


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


def test_dare_ties_base_is_the_configured_or_the_pools_common_base(pool3, base_dir, tmp_path):
    def leaf(tree):
        return np.asarray(tree["embed"][...])

    source, base = DareTies(ml_collections.ConfigDict()).base(pool3)  # default: the pool's common base
    assert source == str(base_dir)
    np.testing.assert_array_equal(leaf(base), np.asarray(create("tiny", seed=9).embed[...]))
    other = save_hf(create("tiny", seed=4), tmp_path / "other")
    source, base = DareTies(ml_collections.ConfigDict(dict(base=str(other)))).base(pool3)  # strategy.base wins
    assert source == str(other)
    np.testing.assert_array_equal(leaf(base), np.asarray(create("tiny", seed=4).embed[...]))
    unrelated = Pool(pool3.members)  # no common base: refused, never the pool's mean
    with pytest.raises(ConfigError, match=r"config\.strategy\.base.*config\.pool\.shared_init=True"):
        DareTies(ml_collections.ConfigDict()).run(unrelated, get_task("synthetic", n_dev=1, n_test=1, n_train=0),
                                                  "test", jax.random.key(0))
    untied = save_hf(create(preset("tiny", tie_embeddings=False), seed=0), tmp_path / "untied")
    with pytest.raises(ConfigError, match="other parameter shapes"):  # an lm_head the members lack
        DareTies(ml_collections.ConfigDict(dict(base=str(untied)))).base(pool3)
    with pytest.raises(ValueError, match="mode"):
        DareTies(ml_collections.ConfigDict(dict(mode="best")))


GROUPS = ("ABCDEF", "GHIJKL")  # letters of no other group's questions and not of the chat template


def _on_grid(x) -> np.ndarray:
    """Rounded to multiples of 2**-12: sums and differences of such float32 values are exact."""
    return (np.round(np.asarray(x, np.float64) * 4096) / 4096).astype(np.float32)


def test_dare_ties_over_the_common_base_keeps_both_planted_skills(tmp_path):
    # A construct where the task vectors are known exactly: two experts fine-tuned from one base, each
    # on the embedding rows of its own group's letters only (untied embeddings: a row is read only
    # where its token appears). An expert's skill is how it answers its group's questions (its next-
    # token distribution there); on the other group it answers as the base does. Over the true base,
    # TIES (DARE off: its random drop would blur the exact identity; DARE is tested above) gives base
    # + both task vectors: every question answered exactly as its expert answers it. The pool's mean
    # as base (the old fallback) cancels the task vectors to the plain average of the two.
    tokenizer = tiny_tokenizer()
    model = create(preset("tiny", tie_embeddings=False), seed=0)
    on_grid = with_params(model, jax.tree.map(lambda x: jnp.asarray(_on_grid(x)), param_tree(model)))
    base = load(save_hf(on_grid, tmp_path / "base", tokenizer))[0]

    def expert(letters: str, seed: int):
        member = with_params(base, param_tree(base))
        embed = np.asarray(member.embed[...]).copy()
        rows = [tokenizer.encode(ch)[0] for ch in letters]
        embed[rows] += _on_grid(0.5 * np.random.default_rng(seed).standard_normal((len(rows), embed.shape[1])))
        member.embed[...] = jnp.asarray(embed)
        return member

    experts = [Member(f"expert_{g}", expert(letters, g), tokenizer) for g, letters in enumerate(GROUPS)]
    pool = Pool(experts, base=str(tmp_path / "base"))
    strategy = DareTies(ml_collections.ConfigDict(dict(drop_p=0.0)))
    source, found = strategy.base(pool)
    merged = with_params(base, strategy.merge(pool, found, [0.5, 0.5]))  # what mode "average" answers with
    trees = [param_tree(m.model) for m in experts]
    mean_base = with_params(base, dare_ties(trees, weighted_mean(trees), drop_p=0.0, density=0.2))

    questions = [letters[i:] + letters[:i] for letters in GROUPS for i in range(0, 6, 2)]  # 6 letters: one length
    ids = jnp.asarray([tokenizer.encode_chat(build_messages(q, "exact", "")) for q in questions])
    next_token = nnx.jit(lambda m, x: jax.nn.log_softmax(m(x)[:, -1], axis=-1))
    owner = [next_token(experts[k // 3].model, ids)[k] for k in range(len(questions))]  # 3 questions per group

    def skill(model) -> int:
        """Questions answered exactly as their expert answers them (the same next-token distribution)."""
        logp = next_token(model, ids)
        return sum(bool(jnp.array_equal(logp[k], owner[k])) for k in range(len(questions)))

    assert source == pool.base
    assert [skill(m.model) for m in experts] + [skill(merged), skill(mean_base)] == [3, 3, 6, 0]


def test_pool_builder_gives_dare_ties_a_common_base_or_refuses_before_training(tmp_path, monkeypatch):
    started = []  # the weights each scratch member's pretraining starts from

    def pretrain(model, *args, **kwargs):
        started.append(params_digest(param_tree(model)))
        return params_of(model), []

    def pretrain_stacked(models, *args, **kwargs):  # members pretrained at once (distill.stack_students)
        started.extend(params_digest(param_tree(m)) for m in models)
        return [params_of(m) for m in models], [[] for _ in models]

    monkeypatch.setattr(pool_builder, "distill_member", pretrain)
    monkeypatch.setattr(pool_builder, "distill_members", pretrain_stacked)
    spec = importlib.util.spec_from_file_location("dare_ties_config", REPO / "configs" / "dare_ties.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(None)
    assert config.pool.shared_init  # the dare_ties config trains its scratch pool from one initialisation
    config.pool.preset, config.pool.models = "tiny", ["m0", "m1"]
    task = get_task("synthetic", n_dev=2, n_test=2, n_train=40)

    def build_pool(workdir):  # with the settings `evolve` hands it for `config` as it is now
        run = settings_of(config)
        return pool_builder.build_pool(run.pool, task, workdir, seed=run.seed, distill=run.distill,
                                       evaluation=run.evaluation, engine=run.engine, mesh=run.mesh,
                                       strategy=config.strategy)

    pool = build_pool(tmp_path / "shared")
    assert pool.base == str(tmp_path / "shared" / "pool" / "base")
    assert started == [params_digest(param_tree(load(pool.base)[0]))] * 2  # both start from the saved base

    config.pool.shared_init = False  # each member its own seed: no common base
    with pytest.raises(ConfigError, match=r"config\.strategy\.base.*config\.pool\.shared_init=True"):
        build_pool(tmp_path / "own")
    assert len(started) == 2  # refused before any training
    config.strategy.base = pool.base  # a base named explicitly
    assert build_pool(tmp_path / "own").base is None
    assert started[2] == started[0] != started[3]  # the shared initialisation is member 0's own

    config.pool.kind, config.distill.replay = "pretrained", 0.0  # copies of one checkpoint: it is the base
    config.pool.models, config.strategy.base = [pool.base, pool.base], ""
    config.engine.max_batch = 8  # the engines cut a round's rows into calls of config.engine.max_batch
    copies = build_pool(tmp_path / "copies")
    assert copies.base == pool.base
    assert copies.engine()._runners[0].max_batch == copies.engine(0)._runner.max_batch == 8
    config.pool.models = [pool.base, str(tmp_path / "shared" / "pool" / "m1")]
    with pytest.raises(ConfigError, match=r"config\.strategy\.base"):
        build_pool(tmp_path / "mixed")


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
