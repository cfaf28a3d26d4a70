"""Where a CPU decode step goes: the profile behind the sampling targets we miss (see BENCHMARKS.md).

    python benchmarks/decode_profile.py

Three tables, all jitted KV-cached decode steps with the cache donated as in the decode loop:
1. SmolLM2-shaped model (random weights, 256-slot cache) at batch 16 and 64, reading the first 64,
   128 or all 256 slots (the engine's decode `window`), next to its weight matmuls and LM head
   timed alone. The step minus the matmuls is attention over the cache and the rest.
2. A stacked pool of 3 SmolLM2-shaped models at batch 16 against 3 single-model steps, and the
   layer matmuls of both forms timed alone.
3. The benchmark's tiny llama (4 layers, d=256, vocab 32k) at batch 16: the whole step, its LM head
   alone, and greedy token selection alone.
"""

from __future__ import annotations

import pathlib
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from agora_jax.models import ModelConfig, RopeConfig, create, preset  # noqa: E402
from agora_jax.sampling.pool import stack_states  # noqa: E402
from agora_jax.sampling.sampler import Decoder, first_argmax, single_decoder, stacked_decoder  # noqa: E402

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
               num_kv_heads=3, head_dim=64)
TINY = ModelConfig(family="llama", vocab_size=32000, hidden_size=256, intermediate_size=688, num_layers=4,
                   num_heads=8, num_kv_heads=4, head_dim=32, rope=RopeConfig(theta=10000.0), rms_norm_eps=1e-5)


def ms(fn, *args, reps: int = 20) -> float:
    """Milliseconds per call of a pure function (after one warm-up call)."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(reps):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - start) / reps * 1e3


def step_ms(decoder: Decoder, params, lead: tuple[int, ...], batch: int, window: int, reps: int = 10) -> float:
    """Milliseconds per decode step of `decoder` with a donated 256-slot cache, reading `window` slots."""
    step = jax.jit(decoder.forward, static_argnums=5, donate_argnums=3)
    cache = jax.tree.map(jnp.copy, decoder.init_cache(params, batch, 256))  # distinct buffers, so donatable
    tokens = jnp.zeros((*lead, batch, 1), jnp.int32)
    mask = jnp.ones((*lead, batch, 1), bool)
    _, cache = jax.block_until_ready(step(params, tokens, tokens, cache, mask, window))
    start = time.perf_counter()
    for _ in range(reps):
        _, cache = jax.block_until_ready(step(params, tokens, tokens, cache, mask, window))
    return (time.perf_counter() - start) / reps * 1e3


def layer_matmuls_ms(c: ModelConfig, rows: int, models: int = 0) -> float:
    """The 7 weight matmuls of every layer (q, k, v, o, gate, up, down), alone; `models` > 0 stacks them."""
    shapes = [(c.hidden_size, c.num_heads * c.head_dim), (c.hidden_size, c.num_kv_heads * c.head_dim),
              (c.hidden_size, c.num_kv_heads * c.head_dim), (c.num_heads * c.head_dim, c.hidden_size),
              (c.hidden_size, c.intermediate_size), (c.hidden_size, c.intermediate_size),
              (c.intermediate_size, c.hidden_size)]
    lead = (models,) if models else ()
    matmul = jax.jit(jnp.matmul)
    return c.num_layers * sum(ms(matmul, jnp.ones((*lead, rows, k)), jnp.ones((*lead, k, n))) for k, n in shapes)


def main() -> None:
    model = create(preset("small", **SMOLLM2), seed=0)
    c = model.config
    single = single_decoder(model)
    params = nnx.state(model)

    print("| batch | slots read | decode step ms | weight matmuls ms | LM head ms |")
    print("|---|---|---|---|---|")
    for batch in (16, 64):
        matmuls = layer_matmuls_ms(c, batch)
        head = ms(jax.jit(jnp.matmul), jnp.ones((batch, c.hidden_size)), jnp.ones((c.hidden_size, c.vocab_size)))
        for window in (64, 128, 256):
            print(f"| {batch} | {window} | {step_ms(single, params, (), batch, window):.0f} | {matmuls:.0f} | "
                  f"{head:.0f} |", flush=True)

    members = [model, create(model.config, seed=1), create(model.config, seed=2)]
    stacked = stacked_decoder(model, 3)
    pool_params = stack_states(members)
    print("\n| 3 models x batch 16, 128 slots read | step ms | layer matmuls ms |")
    print("|---|---|---|")
    print(f"| stacked (one vmapped step) | {step_ms(stacked, pool_params, (3,), 16, 128):.0f} | "
          f"{layer_matmuls_ms(c, 16, models=3):.0f} |", flush=True)
    print(f"| sequential (3 single steps) | {3 * step_ms(single, params, (), 16, 128):.0f} | "
          f"{3 * layer_matmuls_ms(c, 16):.0f} |", flush=True)

    tiny = create(TINY, seed=0)
    logits = jax.random.normal(jax.random.key(0), (16, TINY.vocab_size))
    print("\n| tiny llama, batch 16, 128 slots read | ms |")
    print("|---|---|")
    print(f"| decode step | {step_ms(single_decoder(tiny), nnx.state(tiny), (), 16, 128):.1f} |")
    print(f"| LM head alone (16 x 256 x 32000) | "
          f"{ms(jax.jit(jnp.matmul), jnp.ones((16, 256)), jnp.ones((256, TINY.vocab_size))):.1f} |")
    print(f"| greedy selection alone (first_argmax) | {ms(jax.jit(first_argmax), logits):.1f} |", flush=True)


if __name__ == "__main__":
    main()
