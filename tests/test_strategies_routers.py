"""API-level strategies: every router (the LM router, the MLP on question embeddings, the GNN) learns a
planted rule (member A is right on one question type, B on the other) from real tiny models, caches
its fit, and runs end to end."""

import jax
import ml_collections
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from agora_jax.evolution.config import ConfigError
from agora_jax.models import create, tiny_tokenizer
from agora_jax.sampling import Completion
from agora_jax.strategies.graph_router import GraphRouter
from agora_jax.pool import Member, Pool
from agora_jax.strategies.trained_router import TrainedRouter, best_model_labels
from agora_jax.tasks import Example, Task, build_messages, evaluate, get_task

ROUTERS = [TrainedRouter, GraphRouter]
# (strategy, settings): the LM router with few, large LoRA steps (36 on the 48 dev items)
ROUTER_SETTINGS = {
    "lm": (TrainedRouter, dict(router="lm", lm=dict(epochs=6, batch_size=8, learning_rate=1e-2))),
    "mlp": (TrainedRouter, dict(router="mlp")),
    "gnn": (GraphRouter, {}),
}


def test_labels_best_score_then_confidence_then_index():
    scores = np.array([[1, 1, 0], [0, 0, 0], [0, 1, 0], [1, 1, 1]], np.float32)
    confidence = np.array([[-2, -1, -0.5], [-3, -1, -2], [0, -9, 0], [-1, -1, -1]], np.float32)
    np.testing.assert_array_equal(best_model_labels(scores, confidence), [1, 1, 1, 0])
    np.testing.assert_array_equal(best_model_labels(scores), [0, 0, 1, 0])
    no_confidence = np.full(scores.shape, -np.inf, np.float32)  # e.g. empty answers: the tie stays among the best
    np.testing.assert_array_equal(best_model_labels(scores, no_confidence), [0, 0, 1, 0])


# ---------------------------------------------------------------------- planted rule, scripted answers


def _planted_task(n_dev: int = 48, n_test: int = 40, seed: int = 0) -> Task:
    """Type 1 "Add a and b." and type 2 "Multiply a by b.", interleaved at random."""
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in (("dev", n_dev), ("test", n_test)):
        items = []
        for k in range(n):
            kind, a, b = int(rng.integers(1, 3)), int(rng.integers(10, 100)), int(rng.integers(10, 100))
            question = f"Add {a} and {b}." if kind == 1 else f"Multiply {a} by {b}."
            items.append(Example(id=f"planted/{split}/{k}/type{kind}", question=question,
                                 messages=build_messages(question, "number", ""), answer=str(a + b if kind == 1 else a * b),
                                 answer_type="number"))
        splits[split] = items
    return Task("planted", "number", splits)


class ScriptedAnswers:
    """Backend: member 0 answers type-1 questions right, member 1 type-2, member 2 never; counts calls."""

    def __init__(self, task: Task):
        self.gold = {it.messages[-1]["content"]: (it.answer, int(it.id[-1])) for s in task.splits.values() for it in s}
        self.requests = 0

    def __call__(self, pool, members, prompts, params):
        self.requests += len(members)
        out = []
        for member, messages in zip(members, prompts):
            gold, kind = self.gold[messages[-1]["content"]]
            text = f"The answer is {gold if member == kind - 1 else int(gold) + 1}."
            out.append([Completion(text, [7] * len(text), [-0.5] * len(text), "stop")])
        return out


def unit_gain(model):
    """The random model with every matrix rescaled from std 0.02 to 1/sqrt(fan in) (norms kept), so that
    its layers pass a signal on, as a trained LM's do: at std 0.02 the last position barely sees the
    question, and a LoRA router on it learns in hundreds of steps, from some seeds not at all."""
    graphdef, state = nnx.split(model)

    def rescale(path, x):
        name = jax.tree_util.keystr(path)
        return x if "norm" in name else x / (0.02 * np.sqrt(x.shape[-1] if name == "['embed']" else x.shape[-2]))

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(rescale, nnx.to_pure_dict(state)))


@pytest.fixture(scope="module")
def planted():
    task = _planted_task()
    backend = ScriptedAnswers(task)
    tokenizer = tiny_tokenizer()
    pool = Pool([Member(f"m{i}", unit_gain(create("tiny", seed=i)), tokenizer) for i in range(3)], backend=backend)
    return task, pool, backend


def _weights(model) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


@pytest.mark.parametrize("kind", ROUTER_SETTINGS)
def test_router_learns_planted_rule_and_caches_fit(kind, planted, tmp_path):
    task, pool, backend = planted
    cls, settings = ROUTER_SETTINGS[kind]
    config = ml_collections.ConfigDict(dict(name=cls.name, **settings))
    before = _weights(pool[0].model)
    start = backend.requests
    result = cls(config, tmp_path).run(pool, task, "test", jax.random.key(0))
    assert backend.requests - start == 3 * len(task.dev) + len(task.test)  # fit answers + routed answers
    expected = [f"m{int(it.id[-1]) - 1}" for it in task.test]
    hits = np.mean([r == e for r, e in zip(result.info["routes"], expected)])
    assert hits >= 0.9, (hits, result.info["route_counts"])
    finals = [t for t in result.transcript if t.round == 1 and t.role == "answer"]
    assert [t.model for t in finals] == result.info["routes"] and [t.output for t in finals] == result.answers
    assert evaluate(result.answers, task, "test").accuracy == hits
    assert result.info["fit_cached"] is False
    assert len([t for t in result.transcript if t.round == 0]) == 3 * len(task.dev)
    cache = tmp_path / "strategy" / cls.name / "gen0"
    assert {p.name for p in cache.iterdir()} >= {"router.json", "router.safetensors", "fit_transcript.jsonl"}
    if kind == "lm":  # LoRA adapters of a copy: the routing member's own weights are untouched
        arrays = safetensors.numpy.load_file(str(cache / "router.safetensors"))
        assert {f"lora.{t}.{ab}" for t in ("q", "k", "v", "o", "gate", "up", "down") for ab in "ab"} <= set(arrays)
        assert all(np.array_equal(a, b) for a, b in zip(before, _weights(pool[0].model)))

    # A new strategy object on the same workdir reads the fit: only the routed answers are generated.
    start = backend.requests
    again = cls(config, tmp_path).run(pool, task, "test", jax.random.key(0))
    assert backend.requests - start == len(task.test)
    assert again.info["fit_cached"] is True and again.info["routes"] == result.info["routes"]
    assert not [t for t in again.transcript if t.round == 0]

    # On dev the routed answers are the fit answers: nothing is generated.
    start = backend.requests
    dev = cls(config, tmp_path).run(pool, task, "dev", jax.random.key(0))
    assert backend.requests == start and dev.info["reused_fit_answers"] is True
    assert evaluate(dev.answers, task, "dev").accuracy >= 0.9
    assert [e.completion for e in dev.examples] == dev.answers


@pytest.mark.parametrize("key", ["router", "tie_break"])
def test_trained_router_refuses_unknown_choice_naming_the_key(key):
    with pytest.raises(ConfigError, match=f"config.strategy.{key}='nope'"):
        TrainedRouter(ml_collections.ConfigDict({"name": "trained_router", key: "nope"}))


# ---------------------------------------------------------------------- real engine, tiny pool


@pytest.fixture(scope="module")
def tiny_pool():
    tokenizer = tiny_tokenizer()
    return Pool([Member(f"m{i}", create("tiny", seed=i), tokenizer) for i in range(3)])


@pytest.mark.slow  # two engine compilations (stacked pool for the fit, routed answers): ~20 s alone
@pytest.mark.parametrize("cls", ROUTERS)
def test_router_end_to_end_on_tiny_pool_is_deterministic(cls, tiny_pool, tmp_path):
    task = get_task("synthetic", digits=1, steps=1, n_dev=4, n_test=3, n_train=0)
    config = ml_collections.ConfigDict(dict(name=cls.name, steps=50,
                                            sampling=dict(temperature=0.7, top_p=0.9, max_new_tokens=8)))
    a, b = (cls(config, tmp_path / str(k)).run(tiny_pool, task, "test", jax.random.key(3)) for k in range(2))
    assert a.answers == b.answers and a.info["routes"] == b.info["routes"]
    assert len(a.answers) == len(task.test) and [e.completion for e in a.examples] == a.answers
    final = [t for t in a.transcript if t.round == 1 and t.role == "answer"]
    assert [t.model for t in final] == a.info["routes"]
    assert all(0 < t.output_tokens <= 8 and len(t.logprobs) == t.output_tokens for t in final)
