"""Where a CPU decode step goes: one jitted KV-cached step of a SmolLM2-shaped model (random weights)
at batch 16 and 64 and cache lengths 64 and 256, next to the time of its weight matmuls alone.

    python benchmarks/decode_profile.py

The step time minus the matmul time is attention over the cache and the rest; its growth with the
cache length is what `BENCHMARKS.md` discusses under the sampling results.
"""

from __future__ import annotations

import pathlib
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from agora_jax.models import create, preset  # noqa: E402

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
               num_kv_heads=3, head_dim=64)


def seconds(fn, *args, reps: int = 10) -> float:
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(reps):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - start) / reps


def main() -> None:
    model = create(preset("small", **SMOLLM2), seed=0)
    graphdef, state = nnx.split(model)
    c = model.config

    @jax.jit
    def step(state, tokens, positions, cache):
        return nnx.merge(graphdef, state).forward(tokens, positions, cache)

    def matmul_ms(rows: int, k: int, n: int) -> float:
        return seconds(jax.jit(jnp.matmul), jnp.ones((rows, k), jnp.float32), jnp.ones((k, n), jnp.float32)) * 1e3

    # per layer: q, k, v, o, gate, up, down
    shapes = [(c.hidden_size, c.num_heads * c.head_dim), (c.hidden_size, c.num_kv_heads * c.head_dim),
              (c.hidden_size, c.num_kv_heads * c.head_dim), (c.num_heads * c.head_dim, c.hidden_size),
              (c.hidden_size, c.intermediate_size), (c.hidden_size, c.intermediate_size),
              (c.intermediate_size, c.hidden_size)]
    print("| batch | cache length | decode step ms | weight matmuls ms | LM head ms |")
    print("|---|---|---|---|---|")
    for batch in (16, 64):
        mm = c.num_layers * sum(matmul_ms(batch, k, n) for k, n in shapes)
        lm = matmul_ms(batch, c.hidden_size, c.vocab_size)
        for length in (64, 256):
            cache = model.init_cache(batch, length)
            tokens = jnp.zeros((batch, 1), jnp.int32)
            ms = seconds(step, state, tokens, tokens, cache) * 1e3
            print(f"| {batch} | {length} | {ms:.0f} | {mm:.0f} | {lm:.0f} |", flush=True)


if __name__ == "__main__":
    main()
