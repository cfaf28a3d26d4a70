"""Chunked vocabulary losses equal the direct computation; divergences; zero gradient from prompts."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agora_jax.distill.losses import chunked_token_loss, cross_entropy, divergence

N, D, V = 37, 8, 50  # 37 tokens: not a multiple of the chunk


def ce_chunk(head, h, data, consts):
    targets, weights = data
    return jnp.sum(cross_entropy(h @ head["w"] * consts, targets) * weights)


@pytest.fixture
def problem():
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
    head = {"w": jax.random.normal(k1, (D, V))}
    h = jax.random.normal(k2, (N, D))
    targets = jax.random.randint(k3, (N,), 0, V)
    weights = (jax.random.uniform(k4, (N,)) > 0.3).astype(jnp.float32)
    return head, h, targets, weights


def test_chunked_cross_entropy_matches_direct(problem):
    head, h, targets, weights = problem

    def direct(head, h):
        return jnp.sum(cross_entropy(h @ head["w"] * 2.0, targets) * weights)

    def chunked(head, h):
        return chunked_token_loss(ce_chunk, head, h, (targets, weights), jnp.float32(2.0), chunk=8)

    (v1, (gw1, gh1)) = jax.value_and_grad(direct, argnums=(0, 1))(head, h)
    (v2, (gw2, gh2)) = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(head, h)
    np.testing.assert_allclose(v2, v1, rtol=1e-5)
    np.testing.assert_allclose(gw2["w"], gw1["w"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gh2, gh1, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(jax.jit(chunked)(head, h), v1, rtol=1e-5)  # the primal-only path


def test_prompt_positions_contribute_exactly_zero_gradient(problem):
    head, h, targets, weights = problem
    loss = jax.jit(jax.value_and_grad(
        lambda h, t: chunked_token_loss(ce_chunk, head, h, (t, weights), jnp.float32(1.0), chunk=8)))
    value, grad_h = loss(h, targets)
    prompt = weights == 0
    assert prompt.any()
    assert jnp.all(grad_h[prompt] == 0.0)  # exactly, not approximately
    # changing the targets at prompt positions changes nothing, bit for bit
    perturbed = jnp.where(prompt, (targets + 7) % V, targets)
    value2, grad_h2 = loss(h, perturbed)
    assert value2 == value and jnp.array_equal(grad_h2, grad_h)


def test_divergences():
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    s, t = 3 * jax.random.normal(k1, (5, V)), 3 * jax.random.normal(k2, (5, V))
    ps, pt = jax.nn.softmax(s), jax.nn.softmax(t)
    forward = jnp.sum(pt * (jnp.log(pt) - jnp.log(ps)), -1)
    np.testing.assert_allclose(divergence(s, t, "forward_kl"), forward, rtol=1e-5)
    np.testing.assert_allclose(divergence(s, t, "reverse_kl"), divergence(t, s, "forward_kl"), rtol=1e-5)
    jsd = divergence(s, t, "jsd")
    np.testing.assert_allclose(jsd, divergence(t, s, "jsd"), rtol=1e-5)
    assert jnp.all(jsd > 0) and jnp.all(jsd < jnp.log(2.0))
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        np.testing.assert_allclose(divergence(s, s, kind), 0.0, atol=1e-5)
        np.testing.assert_allclose(divergence(s, t, kind, top_k=V), divergence(s, t, kind), rtol=1e-5)
    # top-k: both renormalised on the teacher's k best tokens
    idx = jnp.argsort(-t, axis=-1)[:, :4]
    sk, tk = jnp.take_along_axis(s, idx, -1), jnp.take_along_axis(t, idx, -1)
    np.testing.assert_allclose(divergence(s, t, top_k=4), divergence(sk, tk), rtol=1e-5)
    # temperature: KL of the softened distributions, times T^2
    np.testing.assert_allclose(divergence(s, t, temperature=2.0), 4 * divergence(s / 2, t / 2), rtol=1e-5)
    # the teacher gets no gradient
    assert jnp.all(jax.grad(lambda t: divergence(s, t).sum())(t) == 0)


def test_chunked_kd_matches_direct(problem):
    head, h, _, weights = problem
    teacher = jax.random.normal(jax.random.PRNGKey(3), (N, V))

    def kd_chunk(head, h, data, consts):
        t, w = data
        return jnp.sum(divergence(h @ head["w"], t, "jsd") * w)

    chunked = functools.partial(chunked_token_loss, kd_chunk, chunk=16)
    g1 = jax.grad(lambda w: chunked({"w": w}, h, (teacher, weights)))(head["w"])
    g2 = jax.grad(lambda w: jnp.sum(divergence(h @ w, teacher, "jsd") * weights))(head["w"])
    np.testing.assert_allclose(g1, g2, rtol=1e-4, atol=1e-6)
