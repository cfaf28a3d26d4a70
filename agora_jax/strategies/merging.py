"""Weight-level merging: pure jnp functions over parameter pytrees of one architecture.

    params = [param_tree(m) for m in models]                       # nnx.State of the nnx.Params
    base = weighted_mean(params)                                     # or one member's / a checkpoint's
    merged = dare_ties(params, base, weights, drop_p=0.5, density=0.2, key=key)
    model = with_params(models[0], merged)

Task vectors are `tau_i = theta_i - base`. DARE (Yu et al. 2024) drops each entry of tau_i with
probability p and rescales the survivors by 1/(1-p), which keeps E[tau_i]. TIES (Yadav et al. 2023)
trims each tau_i to its top-`density` fraction by magnitude (per tensor), elects a sign per entry
(sign of the weighted sum of the trimmed vectors: the sign with the larger total weighted
magnitude), and takes the disjoint mean: the weighted mean over the vectors whose entry is nonzero
and agrees with the elected sign. Merged = base + scale * that mean. Every function works leaf by
leaf (one tensor at a time), so peak memory is N copies of the largest tensor on top of the models.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from agora_jax.pool import Member, Pool

PyTree = Any


def param_tree(model: nnx.Module) -> nnx.State:
    """The model's `nnx.Param`s as a pytree (shared by reference, not copied)."""
    return nnx.state(model, nnx.Param)


def with_params(model: nnx.Module, params: PyTree) -> nnx.Module:
    """A new model with `model`'s structure and other state, and parameters `params`. Its variables
    are new containers (the arrays are shared), so updating it in place never changes `params`' owner."""
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x, params), jax.tree.map(lambda x: x, rest))


def check_compatible(trees: Sequence[PyTree]) -> None:
    """Raises ValueError unless every tree has the first one's structure, shapes and dtypes."""
    ref = jax.tree.structure(trees[0])
    ref_shapes = [(x.shape, x.dtype) for x in jax.tree.leaves(trees[0])]
    for i, tree in enumerate(trees[1:], 1):
        shapes = [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]
        if jax.tree.structure(tree) != ref or shapes != ref_shapes:
            raise ValueError(f"cannot merge: model {i} has a different parameter structure, shape or dtype than "
                             "model 0 (weight merging needs one architecture)")


def _weights(weights: Sequence[float] | None, n: int) -> jax.Array:
    w = jnp.full((n,), 1.0 / n, jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
    if w.shape != (n,):
        raise ValueError(f"{w.shape[0]} merge weights for {n} models")
    return w


def _broadcast(w: jax.Array, x: jax.Array) -> jax.Array:
    return w.reshape((-1,) + (1,) * (x.ndim - 1))


def weighted_mean(trees: Sequence[PyTree], weights: Sequence[float] | None = None) -> PyTree:
    """sum_i w_i theta_i / sum_i w_i (equal weights by default): plain weight averaging."""
    check_compatible(trees)
    w = _weights(weights, len(trees))
    if float(jnp.sum(w)) <= 0:
        raise ValueError(f"weighted_mean needs a positive total weight, got {list(map(float, w))}")
    return _weighted_mean(list(trees), w)


@jax.jit
def _weighted_mean(trees: list[PyTree], w: jax.Array) -> PyTree:
    def leaf(*xs):
        x = jnp.stack(xs).astype(jnp.float32)
        return (jnp.sum(_broadcast(w, x) * x, 0) / jnp.sum(w)).astype(xs[0].dtype)

    return jax.tree.map(leaf, *trees)


def _dare(x: jax.Array, key: jax.Array, p: float) -> jax.Array:
    keep = jax.random.bernoulli(key, 1.0 - p, x.shape)
    return jnp.where(keep, x / (1.0 - p), jnp.zeros_like(x))


@functools.partial(jax.jit, static_argnames="p")
def dare_drop(x: jax.Array, key: jax.Array, p: float) -> jax.Array:
    """DARE on one tensor: zero each entry with probability p, scale the rest by 1/(1-p)."""
    return x if p == 0.0 else _dare(x, key, p)


def trim(x: jax.Array, density: float) -> jax.Array:
    """TIES trim of one tensor: keep the round(density * size) largest magnitudes (at least one;
    entries tied with the threshold magnitude are all kept), zero the rest."""
    if density >= 1.0:
        return x
    k = max(1, int(round(density * x.size)))
    threshold = jnp.sort(jnp.abs(x).ravel())[x.size - k]
    return jnp.where(jnp.abs(x) >= threshold, x, jnp.zeros_like(x))


def ties_delta(stacked: jax.Array, weights: jax.Array, density: float) -> jax.Array:
    """TIES on one tensor stacked over models `[N, ...]`: trim, elect signs, disjoint weighted mean."""
    trimmed = jax.vmap(lambda x: trim(x, density))(stacked)
    weighted = _broadcast(weights, trimmed) * trimmed
    elected = jnp.sign(jnp.sum(weighted, 0))
    agree = (jnp.sign(trimmed) == elected[None]) & (trimmed != 0)
    total = jnp.sum(jnp.where(agree, weighted, 0.0), 0)
    norm = jnp.sum(jnp.where(agree, _broadcast(weights, trimmed), 0.0), 0)
    return jnp.where(norm > 0, total / jnp.where(norm > 0, norm, 1.0), 0.0)


@functools.partial(jax.jit, static_argnames=("drop_p", "density"))
def _dare_ties_leaf(stacked: jax.Array, base: jax.Array, weights: jax.Array, key: jax.Array, leaf: jax.Array,
                    scale: jax.Array, drop_p: float, density: float) -> jax.Array:
    """One tensor: task vectors, DARE with key fold_in(fold_in(key, leaf), model), TIES, back onto base."""
    deltas = stacked.astype(jnp.float32) - base.astype(jnp.float32)[None]
    if drop_p > 0:
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(key, leaf), i))(jnp.arange(len(stacked)))
        deltas = jax.vmap(lambda d, k: _dare(d, k, drop_p))(deltas, keys)
    return (base.astype(jnp.float32) + scale * ties_delta(deltas, weights, density)).astype(base.dtype)


def dare_ties(
    trees: Sequence[PyTree],
    base: PyTree,
    weights: Sequence[float] | None = None,
    drop_p: float = 0.5,
    density: float = 0.2,
    scale: float = 1.0,
    key: jax.Array | None = None,
) -> PyTree:
    """base + scale * TIES(DARE(theta_i - base)). `drop_p=0` skips DARE, `density=1` skips the trim.

    DARE's mask for model i and tensor j uses `fold_in(fold_in(key, j), i)` (leaves in tree order), so
    the merge is a deterministic function of `key`. Weights default to equal; they enter the sign
    election and the disjoint mean, so only their ratios matter (all zero gives the base). One jitted
    program per tensor shape: peak memory is N float32 copies of the largest tensor.
    """
    if not 0.0 <= drop_p < 1.0 or not 0.0 < density <= 1.0:
        raise ValueError(f"dare_ties needs 0 <= drop_p < 1 and 0 < density <= 1, got {drop_p}, {density}")
    if drop_p > 0 and key is None:
        raise ValueError("dare_ties with drop_p > 0 needs a PRNG key")
    check_compatible([base, *trees])
    w = _weights(weights, len(trees))
    key = jax.random.key(0) if key is None else key
    leaves = [jax.tree.leaves(t) for t in trees]
    base_leaves, treedef = jax.tree.flatten(base)
    merged = [_dare_ties_leaf(jnp.stack([model_leaves[j] for model_leaves in leaves]), b, w, key, jnp.int32(j),
                              jnp.float32(scale), drop_p=float(drop_p), density=float(density))
              for j, b in enumerate(base_leaves)]
    return jax.tree.unflatten(treedef, merged)


class MergedModel:
    """The merged model of a weight-level strategy, as a one-member pool kept across runs: a new merge
    is written into it in place (`nnx.update`) and its engine, compiled once, reads the current
    weights on every call (any number of merges: PSO particles, evolution rounds)."""

    def __init__(self, name: str):
        self.name = name
        self.pool: Pool | None = None

    def load(self, pool: Pool, params: Any) -> Pool:
        """The one-member pool with `pool[0]`'s architecture and tokenizer and parameters `params`."""
        held = self.pool
        if held is None or held[0].model.config != pool[0].model.config or held[0].tokenizer is not pool[0].tokenizer:
            member = Member(self.name, with_params(pool[0].model, params), pool[0].tokenizer)
            self.pool = pool.of([member])
        else:
            nnx.update(held[0].model, params)
            held.generation = pool.generation
        return self.pool
