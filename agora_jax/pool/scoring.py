"""Log-likelihoods of completions under one model: the batched forward behind `Pool.score_batch`."""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from agora_jax.models import Transformer
from agora_jax.sampling.engine import bucket

@functools.partial(jax.jit, static_argnums=0)
def _read_logprobs(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array, mask: jax.Array,
                   positions: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(targets[b, c] | ids[b, :positions[b, c] + 1]), `[B, C]`: logits only where read."""
    model = nnx.merge(graphdef, state)
    hidden = model.hidden_states(ids, mask)
    picked = jnp.take_along_axis(hidden, positions[..., None], axis=1)  # [B, C, D]
    logp = jax.nn.log_softmax(model.logits(picked).astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def completion_logprobs(model: Transformer, pairs: Sequence[tuple[list[int], list[int]]],
                        max_batch_tokens: int = 8192, max_logits: int = 2**24) -> list[np.ndarray]:
    """Per-token log-probabilities of each completion given its prompt (token ids).

    A completion's last token is never an input, so each pair runs as the sequence prompt +
    completion[:-1] and pairs sharing that sequence share one row (options of one token after one
    prompt: one forward). Rows are right-padded and bucketed to powers of two; a batch holds at most
    `max_batch_tokens` tokens and `max_logits` logits."""
    rows: dict[tuple[int, ...], list[tuple[int, int, int]]] = {}  # sequence -> (pair, position, target)
    for k, (prompt, completion) in enumerate(pairs):
        if not prompt:
            raise ValueError("scoring needs a non-empty prompt")
        reads = rows.setdefault(tuple(prompt) + tuple(completion[:-1]), [])
        reads += [(k, len(prompt) - 1 + t, target) for t, target in enumerate(completion)]
    out = [np.zeros(len(c), np.float32) for _, c in pairs]
    graphdef, state = nnx.split(model)
    shapes: dict[tuple[int, int], list[tuple[int, ...]]] = {}  # (length, reads) buckets -> rows
    for seq, reads in rows.items():
        shapes.setdefault((bucket(len(seq), 16), bucket(len(reads))), []).append(seq)
    for (length, width), seqs in shapes.items():
        size = max(1, min(max_batch_tokens // length, max_logits // (width * model.config.vocab_size)))
        for lo in range(0, len(seqs), size):
            chunk = seqs[lo:lo + size]
            batch = bucket(len(chunk))
            ids, mask = np.zeros((batch, length), np.int32), np.zeros((batch, length), bool)
            positions, targets = np.zeros((batch, width), np.int32), np.zeros((batch, width), np.int32)
            for r, seq in enumerate(chunk):
                ids[r, :len(seq)], mask[r, :len(seq)] = seq, True
                positions[r, :len(rows[seq])] = [p for _, p, _ in rows[seq]]
                targets[r, :len(rows[seq])] = [t for _, _, t in rows[seq]]
            logp = np.asarray(_read_logprobs(graphdef, state, *map(jnp.asarray, (ids, mask, positions, targets))))
            for r, seq in enumerate(chunk):
                for c, (k, p, _) in enumerate(rows[seq]):
                    out[k][p - len(pairs[k][0]) + 1] = logp[r, c]
    return out

