"""A digest of a parameter pytree that changes whenever any weight does: what cached fits are keyed by."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Odd multipliers (Knuth's 2654435761 and the murmur3 finaliser constant) of the two position weights.
_MULTIPLIERS = (2654435761, 0x85EBCA6B)


def _leaf_sums(x: jax.Array) -> jax.Array:
    """Two uint32 checksums of one tensor's bits: sum_i bits_i * (c * i | 1) mod 2**32 for both
    multipliers c, where i is the flat position. Each weight is odd, hence invertible mod 2**32, so
    changing any single element changes both sums; uint32 addition is associative, so the sums do not
    depend on sharding or reduction order, and positions come from iotas (no reshape of a sharded
    array)."""
    width = jnp.dtype(x.dtype).itemsize * 8
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    elif width > 32:  # split each element into 32-bit words (a new minor axis)
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    else:
        bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{width}")).astype(jnp.uint32)
    position, stride = jnp.zeros(bits.shape, jnp.uint32), 1
    for axis in reversed(range(bits.ndim)):
        position += jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= bits.shape[axis]
    return jnp.stack([jnp.sum(bits * (position * jnp.uint32(c) | jnp.uint32(1)), dtype=jnp.uint32)
                      for c in _MULTIPLIERS])


_tree_sums = jax.jit(lambda leaves: jnp.stack([_leaf_sums(x) for x in leaves]))


def params_digest(tree: Any) -> str:
    """A hex digest of a parameter pytree: its structure, every leaf's path, shape and dtype, and the
    leaf checksums (`_leaf_sums`), combined on the host."""
    paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(tree)[0])
    sums = np.asarray(_tree_sums(list(leaves))).tolist()
    return sha256([[jax.tree_util.keystr(p), list(x.shape), str(x.dtype), s] for p, x, s in zip(paths, leaves, sums)])


def sha256(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj).encode()).hexdigest()

