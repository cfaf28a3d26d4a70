"""Token losses over a large vocabulary without materialising `[B, T, V]` logits.

`chunked_token_loss` runs a per-token loss over chunks of positions; its forward pass also computes
the gradient chunk by chunk (one logits matmul forward, two backward), so neither the logits nor
their gradients of more than one chunk ever exist, and the backward pass does not recompute them.

Losses are sums over tokens (weights select and scale tokens); callers divide by the weight total,
which keeps gradient accumulation exactly equal to one large batch.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp

Array = jax.Array
PyTree = Any
Divergence = Literal["forward_kl", "reverse_kl", "jsd"]


def cross_entropy(logits: Array, targets: Array) -> Array:
    """Per-token next-token cross-entropy (float32)."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked


def divergence(student_logits: Array, teacher_logits: Array, kind: Divergence = "forward_kl",
               temperature: float = 1.0, top_k: int | None = None) -> Array:
    """Per-token divergence between teacher and student distributions at `temperature`.

    forward_kl = KL(teacher || student) (mode covering), reverse_kl = KL(student || teacher) (mode
    seeking), jsd = the Jensen-Shannon divergence. With `top_k`, both distributions are restricted to
    (and renormalised on) the teacher's k most likely tokens. Scaled by temperature**2 (Hinton).
    """
    s = student_logits.astype(jnp.float32) / temperature
    t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)) / temperature
    if top_k is not None and top_k < t.shape[-1]:
        t, idx = jax.lax.top_k(t, top_k)
        s = jnp.take_along_axis(s, idx, axis=-1)
    log_s, log_t = jax.nn.log_softmax(s, axis=-1), jax.nn.log_softmax(t, axis=-1)
    p_s, p_t = jnp.exp(log_s), jnp.exp(log_t)
    if kind == "forward_kl":
        out = jnp.sum(p_t * (log_t - log_s), axis=-1)
    elif kind == "reverse_kl":
        out = jnp.sum(p_s * (log_s - log_t), axis=-1)
    elif kind == "jsd":
        log_m = jnp.logaddexp(log_s, log_t) - jnp.log(2.0)
        out = 0.5 * jnp.sum(p_t * (log_t - log_m), axis=-1) + 0.5 * jnp.sum(p_s * (log_s - log_m), axis=-1)
    else:
        raise ValueError(f"unknown divergence {kind!r}; use forward_kl, reverse_kl or jsd")
    return out * temperature**2


def _zero_cotangent(x: Array) -> Array:
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return jnp.zeros(x.shape, jax.dtypes.float0)


ChunkLoss = Callable[[PyTree, Array, PyTree, PyTree], Array]


def chunked_token_loss(fn: ChunkLoss, params: PyTree, hidden: Array, data: PyTree, consts: PyTree = None,
                       chunk: int = 256) -> Array:
    """`sum_c fn(params, hidden[c], data[c], consts)` over chunks c of the leading (token) axis.

    `fn` returns the summed loss of a chunk; `params` (e.g. the LM head) and `hidden` get gradients,
    `data` (per-token, chunked like `hidden`) and `consts` do not. The token count is padded up to a
    multiple of `chunk`; `fn` must give zero loss on all-zero padding `data` (zero weights do).
    """
    n = hidden.shape[0]
    chunk = min(chunk, n)
    pad = -n % chunk

    def split(x: Array) -> Array:
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape(-1, chunk, *x.shape[1:])

    def forward_only(params, hidden, data, consts):
        def body(total, xs):
            h, d = xs
            return total + fn(params, h, d, consts), None
        total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (split(hidden), jax.tree.map(split, data)))
        return total

    def forward_with_grads(params, hidden, data, consts):
        def body(carry, xs):
            total, grad_params = carry
            h, d = xs
            loss, vjp = jax.vjp(lambda p, h: fn(p, h, d, consts), params, h)
            g_params, g_h = vjp(jnp.ones_like(loss))
            return (total + loss, jax.tree.map(jnp.add, grad_params, g_params)), g_h

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.result_type(p, jnp.float32)), params)
        (total, g_params), g_h = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros),
                                              (split(hidden), jax.tree.map(split, data)))
        g_h = g_h.reshape(-1, *hidden.shape[1:])[:n]
        return total, (g_params, g_h, jax.tree.map(_zero_cotangent, (data, consts)))

    @jax.custom_vjp
    def loss(params, hidden, data, consts):
        return forward_only(params, hidden, data, consts)

    def bwd(residuals, g):
        g_params, g_h, (g_data, g_consts) = residuals
        g_params = jax.tree.map(lambda x, p: (g * x).astype(p.dtype), g_params, params)
        return g_params, (g * g_h).astype(hidden.dtype), g_data, g_consts

    loss.defvjp(forward_with_grads, bwd)
    return loss(params, hidden, data, consts)
