"""Sampling engine on tiny models: cached decoding vs full forward, batch invariance, stop handling,
sampling filters, compilation counts, stacked pools and logit fusion."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from agora_jax.models import Transformer, create, preset, tiny_tokenizer
from agora_jax.models.tokenizer import Tokenizer
from agora_jax.sampling import Engine, PoolEngine, SamplingParams, encode_prompt, filter_logits, select_tokens
from agora_jax.sampling.sampler import NUCLEUS_CANDIDATES, Knobs, decode_windows, first_argmax, fuse, single_decoder

TOK = tiny_tokenizer()
PROMPTS = [
    [{"role": "user", "content": "Hello there, who are you?"}],
    "The quick brown fox",
    [5, 17, 99, 3, 250, 8, 8, 41, 200, 13, 77, 6, 120, 90, 31, 64, 7, 222, 19],  # longer than 16: next bucket
]
GREEDY = SamplingParams(max_new_tokens=24, stop_token_ids=())
SAMPLED = SamplingParams(max_new_tokens=24, temperature=0.8, top_p=0.95, seed=(7, 8, 9), stop_token_ids=())


def make_model(seed: int = 0, **overrides) -> Transformer:
    """A tiny random model with weights jittered enough that greedy decoding does not just repeat."""
    model = create(preset("tiny", **overrides), seed=seed)
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    return nnx.merge(graphdef, jax.tree.unflatten(
        treedef, [x + 0.2 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]))


@pytest.fixture(scope="module")
def model() -> Transformer:
    return make_model(0)


@pytest.fixture(scope="module")
def engine(model) -> Engine:
    return Engine(model, TOK)


@pytest.fixture(scope="module")
def greedy(engine) -> list:
    return [cs[0] for cs in engine.generate(PROMPTS, GREEDY)]


def full_logprobs(model: Transformer, prompt: list[int], new: list[int]) -> np.ndarray:
    """log p(new[t] | prompt, new[:t]) from one uncached forward over the whole sequence."""
    logits = model(jnp.asarray([prompt + new]))[0, len(prompt) - 1:-1]
    return np.asarray(jax.nn.log_softmax(logits, axis=-1))


@pytest.mark.parametrize("tight", [False, True])
def test_cached_step_logits_equal_full_forward(model, tight):
    """Prefill + one token at a time through the KV cache gives the logits of the full forward, whether
    attention reads the whole cache or only the slots written so far (`window`)."""
    decoder = single_decoder(model)
    forward = jax.jit(decoder.forward, static_argnums=5)
    params = nnx.state(model)
    ids = np.random.RandomState(0).randint(3, 260, (2, 12))
    mask = np.ones_like(ids, bool)
    mask[1, :5] = False  # left padding
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    cache = decoder.init_cache(params, 2, 20)
    _, cache = forward(params, jnp.asarray(ids[:, :8]), jnp.asarray(positions[:, :8]), cache,
                       jnp.asarray(mask[:, :8]), 0 if tight else None)
    full = model(jnp.asarray(ids), jnp.asarray(mask))
    for t in range(8, 12):
        step, cache = forward(params, jnp.asarray(ids[:, t:t + 1]), jnp.asarray(positions[:, t:t + 1]), cache,
                              jnp.asarray(mask[:, t:t + 1]), t if tight else None)
        np.testing.assert_allclose(step, full[:, t], atol=1e-4)


def test_first_argmax_equals_argmax_with_ties():
    x = np.round(np.random.RandomState(0).randn(64, 1000), 1)  # many ties at the maximum
    x[3] = 0.0
    np.testing.assert_array_equal(first_argmax(jnp.asarray(x)), np.argmax(x, axis=-1))


def test_decode_windows_cover_every_step():
    assert decode_windows(64, 128) == [80, 96, 128, 192]
    assert decode_windows(16, 16) == [32]
    assert decode_windows(16, 8) == [24]
    for prompt_len, max_new in [(16, 16), (64, 128), (32, 512)]:
        windows = decode_windows(prompt_len, max_new)
        assert windows == sorted(windows) and windows[-1] == prompt_len + max_new  # ends at the whole cache


def test_greedy_equals_full_forward_argmax(model, greedy):
    for prompt, completion in zip(PROMPTS, greedy):
        reference = full_logprobs(model, encode_prompt(TOK, prompt), completion.tokens)
        assert completion.tokens == reference.argmax(-1).tolist()
        chosen = reference[np.arange(len(completion.tokens)), completion.tokens]
        np.testing.assert_allclose(completion.logprobs, chosen, atol=1e-4)
        assert completion.finish_reason == "length" and len(completion.tokens) == GREEDY.max_new_tokens
        assert completion.text == TOK.decode(completion.tokens)


def test_batch_invariance(engine, greedy):
    """A prompt alone (batch 1, its own prompt bucket) decodes exactly as inside a padded batch,
    greedy or sampled (a row's randomness depends only on its seed and sample index)."""
    for prompt, in_batch in zip(PROMPTS, greedy):
        assert engine.generate([prompt], GREEDY)[0][0].tokens == in_batch.tokens
    together = engine.generate(PROMPTS, SAMPLED)
    alone = engine.generate([PROMPTS[1]], SamplingParams(**{**vars(SAMPLED), "seed": (8,)}))
    assert alone[0][0].tokens == together[1][0].tokens


def test_stop_token_ends_row_and_loop(engine, greedy):
    target = greedy[0].tokens[5]
    first = greedy[0].tokens.index(target)
    outs = engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=24, stop_token_ids=(target,)))
    c = outs[0][0]
    assert c.tokens == greedy[0].tokens[:first + 1] and c.finish_reason == "stop"
    assert c.text == TOK.decode(greedy[0].tokens[:first])
    assert len(c.logprobs) == len(c.tokens)
    # every row stopping on its first token: the loop exits early, rows keep only that token
    firsts = tuple({g.tokens[0] for g in greedy})
    for c in (cs[0] for cs in engine.generate(PROMPTS, SamplingParams(max_new_tokens=24, stop_token_ids=firsts))):
        assert len(c.tokens) == 1 and c.finish_reason == "stop" and c.text == ""


def ascii_stop(text: str) -> str:
    """A two-character alphanumeric ASCII piece of `text` past its start (random bytes decode to
    replacement characters, which make poor stop strings)."""
    return next(text[i:i + 2] for i in range(3, len(text)) if text[i:i + 2].isascii() and text[i:i + 2].isalnum())


def test_stop_strings(engine, greedy):
    text = greedy[1].text
    stop = ascii_stop(text)
    cut = text.find(stop)
    c = engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=24, stop_token_ids=(), stop_strings=(stop, "zzzz")))
    c = c[0][0]
    assert c.text == text[:cut] and c.finish_reason == "stop"
    assert stop in TOK.decode(c.tokens) and stop not in TOK.decode(c.tokens[:-1])  # the shortest such prefix
    assert c.tokens == greedy[1].tokens[:len(c.tokens)] and len(c.logprobs) == len(c.tokens)


def test_default_stops_come_from_the_tokenizer(model, greedy):
    """`stop_token_ids=None` / `stop_strings=None` use `Tokenizer.stop_ids` / `Tokenizer.stop_strings`."""
    target, stop = greedy[2].tokens[9], ascii_stop(greedy[1].text)

    class Stopping(Tokenizer):
        stop_ids = (target,)
        stop_strings = (stop,)

    outs = Engine(model, Stopping(TOK.hf)).generate(PROMPTS, SamplingParams(max_new_tokens=24))
    assert outs[2][0].tokens == greedy[2].tokens[:greedy[2].tokens.index(target) + 1]
    assert outs[1][0].text == greedy[1].text[:greedy[1].text.find(stop)]
    assert {cs[0].finish_reason for cs in outs[1:]} == {"stop"}


def test_seeds_and_samples(engine, greedy):
    params = SamplingParams(**{**vars(SAMPLED), "n": 2, "seed": 5})
    a = engine.generate(PROMPTS[1:], params)
    assert [[c.tokens for c in cs] for cs in a] == [[c.tokens for c in cs] for cs in engine.generate(PROMPTS[1:], params)]
    assert a[0][0].tokens != a[0][1].tokens  # the n samples differ
    b = engine.generate(PROMPTS[1:], SamplingParams(**{**vars(params), "seed": 6}))
    assert a[0][0].tokens != b[0][0].tokens
    # prompt i of a call with seed s uses seed s + i
    c = engine.generate(PROMPTS[:0:-1], SamplingParams(**{**vars(params), "seed": (6, 0)}))
    assert [x.tokens for x in c[0]] == [x.tokens for x in a[1]]
    top1 = engine.generate(PROMPTS[1:], SamplingParams(**{**vars(params), "top_k": 1}))
    assert [cs[0].tokens for cs in top1] == [g.tokens for g in greedy[1:]]


def _reference_filter(logits: np.ndarray, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """Which tokens survive top-k, then top-p (on the top-k distribution), then min-p, one row."""
    order = np.argsort(-logits, kind="stable")
    keep = np.zeros(len(logits), bool)
    keep[order[:top_k or len(logits)]] = True
    probs = np.exp(logits - logits.max()) * keep
    probs /= probs.sum()
    before = np.cumsum(probs[order]) - probs[order]
    nucleus = np.zeros(len(logits), bool)
    nucleus[order[before < top_p]] = True
    keep &= nucleus
    full = np.exp(logits - logits.max())
    return keep & (full >= min_p * full.max())


@pytest.mark.parametrize("top_k,top_p,min_p", [(0, 1.0, 0.0), (5, 1.0, 0.0), (0, 0.7, 0.0), (0, 1.0, 0.2),
                                               (8, 0.9, 0.05), (1, 0.5, 0.0)])
def test_filter_logits(top_k, top_p, min_p):
    logits = np.random.RandomState(top_k).randn(4, 50).astype(np.float32) * 2
    out = np.asarray(filter_logits(jnp.asarray(logits), jnp.int32(top_k), jnp.float32(top_p), jnp.float32(min_p)))
    for row, filtered in zip(logits, out):
        keep = _reference_filter(row, top_k, top_p, min_p)
        np.testing.assert_array_equal(np.isfinite(filtered), keep)
        np.testing.assert_array_equal(filtered[keep], row[keep])


@pytest.mark.parametrize("top_k,top_p,min_p", [(0, 0.9, 0.0), (40, 0.95, 0.0), (2000, 0.8, 0.01)])
def test_filter_logits_large_vocabulary_ranks_only_candidates_exactly(top_k, top_p, min_p):
    """With a real-size vocabulary only the best NUCLEUS_CANDIDATES tokens are ranked; while the
    nucleus fits among them the result equals the full-sort reference (here: peaked logits)."""
    logits = np.random.RandomState(1).randn(3, 49152).astype(np.float32) * 4
    out = np.asarray(filter_logits(jnp.asarray(logits), jnp.int32(top_k), jnp.float32(top_p), jnp.float32(min_p)))
    for row, filtered in zip(logits, out):
        keep = _reference_filter(row, top_k, top_p, min_p)
        assert 1 < keep.sum() < NUCLEUS_CANDIDATES
        np.testing.assert_array_equal(np.isfinite(filtered), keep)


def test_select_tokens_samples_the_distribution():
    logits = jnp.asarray(np.log([[0.5, 0.3, 0.15, 0.05]]), jnp.float32).repeat(4000, 0)
    keys = jax.random.split(jax.random.key(0), 4000)

    def freq(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
        knobs = Knobs(jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p), jnp.float32(min_p),
                      jnp.zeros(4, bool), jnp.int32(1))
        tokens, logprobs = select_tokens(logits, keys, knobs, greedy=False)
        np.testing.assert_allclose(logprobs, np.log([0.5, 0.3, 0.15, 0.05])[tokens], rtol=1e-5)
        return np.bincount(np.asarray(tokens), minlength=4) / 4000

    np.testing.assert_allclose(freq(), [0.5, 0.3, 0.15, 0.05], atol=0.03)
    np.testing.assert_allclose(freq(top_k=2), [0.625, 0.375, 0, 0], atol=0.03)
    np.testing.assert_allclose(freq(top_p=0.7), [0.625, 0.375, 0, 0], atol=0.03)
    np.testing.assert_allclose(freq(min_p=0.25), [0.526, 0.316, 0.158, 0], atol=0.03)
    sharp = np.array([0.5, 0.3, 0.15, 0.05]) ** 2
    np.testing.assert_allclose(freq(temperature=0.5), sharp / sharp.sum(), atol=0.03)


def test_compilations_are_bounded():
    engine = Engine(make_model(0, num_layers=1), TOK)  # an architecture no other test compiles
    engine.generate([[3, 4, 5]], SamplingParams(max_new_tokens=20))
    assert engine.num_compilations == 2  # prefill + decode
    # same buckets (batch 1, prompt 16, budget 32), runtime settings: nothing new
    engine.generate([list(range(3, 12))], SamplingParams(max_new_tokens=30, stop_token_ids=(5,), stop_strings=("a",)))
    assert engine.num_compilations == 2
    engine.generate([[3, 4, 5]], SamplingParams(max_new_tokens=20, temperature=0.5, seed=3))
    engine.generate([[3, 4, 5, 6]], SamplingParams(max_new_tokens=17, temperature=0.9, top_p=0.5, top_k=3, min_p=0.1))
    assert engine.num_compilations == 4  # sampling is a second pair of programs
    engine.generate([[3, 4, 5]] * 3, SamplingParams(max_new_tokens=20))
    engine.generate([[3, 4]] * 2, SamplingParams(max_new_tokens=20, n=2))
    assert engine.num_compilations == 6  # batch bucket 4
    assert engine.compile_seconds > 0
    again = Engine(make_model(1, num_layers=1), TOK)  # same architecture, new weights: programs are shared
    again.generate([[3, 4, 5]], SamplingParams(max_new_tokens=20))
    assert again.num_compilations == 0


def test_stacked_pool_equals_each_model_alone():
    models = [make_model(1), make_model(2), make_model(3), make_model(4, num_layers=3)]
    pool = PoolEngine(models, [TOK] * 4)
    assert pool.groups == [[0, 1, 2], [3]]
    prompts = [PROMPTS, PROMPTS[::-1], [], PROMPTS[:1]]
    outs = pool.generate(prompts, GREEDY)
    for model, member_prompts, member_outs in zip(models, prompts, outs):
        alone = Engine(model, TOK).generate(member_prompts, GREEDY)
        assert [cs[0].tokens for cs in member_outs] == [cs[0].tokens for cs in alone]
        for a, b in zip(member_outs, alone):
            np.testing.assert_allclose(a[0].logprobs, b[0].logprobs, atol=1e-4)
    # per-prompt seeds of a pool call run member-major: member 1's prompts take seeds 3..5
    pool_seeds = SamplingParams(**{**vars(SAMPLED), "seed": (1, 2, 3, 7, 8, 9, 4, 5, 6)})
    pool_sampled = pool.generate([PROMPTS, PROMPTS, PROMPTS, []], pool_seeds)
    assert [cs[0].tokens for cs in pool_sampled[1]] == [cs[0].tokens for cs in Engine(models[1], TOK).generate(
        PROMPTS, SAMPLED)]


def test_identical_members_sample_differently(model):
    """One int seed numbers a pool call's prompts member-major, so two members with the same weights
    given the same prompts draw different samples (and member 1 equals the model alone at seed + 3)."""
    pool = PoolEngine([model, model], [TOK] * 2)
    params = SamplingParams(**{**vars(SAMPLED), "seed": 11, "temperature": 1.5})
    first, second = pool.generate([PROMPTS, PROMPTS], params)
    assert [cs[0].tokens for cs in first] != [cs[0].tokens for cs in second]
    alone = Engine(model, TOK).generate(PROMPTS, SamplingParams(**{**vars(params), "seed": 11 + len(PROMPTS)}))
    assert [cs[0].tokens for cs in second] == [cs[0].tokens for cs in alone]


def test_fused_copies_equal_the_model(model, greedy):
    pool = PoolEngine([model, model, model], [TOK] * 3)
    fused = pool.fused_generate(PROMPTS, GREEDY, weights=[1, 2, 1])
    assert [cs[0].tokens for cs in fused] == [g.tokens for g in greedy]
    for f, g in zip(fused, greedy):
        np.testing.assert_allclose(f[0].logprobs, g.logprobs, atol=1e-4)


@pytest.mark.parametrize("mode", ["logits", "probs"])
def test_fuse_averages_logits_or_probabilities(mode):
    logits = jax.random.normal(jax.random.key(0), (3, 2, 7)) * 3
    weights = jnp.asarray([0.5, 0.3, 0.2])
    out = np.asarray(jax.nn.log_softmax(fuse(logits, weights, mode)))
    if mode == "probs":
        expected = np.log(np.einsum("m,mbv->bv", weights, jax.nn.softmax(logits)))
    else:
        expected = np.asarray(jax.nn.log_softmax(np.einsum("m,mbv->bv", weights, logits)))
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_fused_mixes_members(model):
    """Probability fusion of two architectures sharing a vocabulary: the fused log-probabilities are
    the log of the weighted average of the members' next-token distributions; weights (1, 0) give the
    first member alone."""
    other = make_model(5, num_layers=3)
    pool = PoolEngine([model, other], [TOK, TOK])
    prompt = TOK.encode("Once upon a time")
    c = pool.fused_generate([prompt], GREEDY, weights=[3, 1], mode="probs")[0][0]
    a = model(jnp.asarray([prompt + c.tokens]))[0, len(prompt) - 1:-1]
    b = other(jnp.asarray([prompt + c.tokens]))[0, len(prompt) - 1:-1]
    mixed = np.log(0.75 * jax.nn.softmax(a) + 0.25 * jax.nn.softmax(b))
    assert c.tokens == mixed.argmax(-1).tolist()
    np.testing.assert_allclose(c.logprobs, mixed[np.arange(len(c.tokens)), c.tokens], atol=1e-4)
    alone = Engine(model, TOK).generate([prompt], GREEDY)[0][0]
    assert pool.fused_generate([prompt], GREEDY, weights=[1, 0], mode="probs")[0][0].tokens == alone.tokens
    assert pool.num_compilations == 2  # new weights do not recompile
