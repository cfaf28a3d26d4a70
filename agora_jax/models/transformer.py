"""One Flax NNX decoder-only transformer for the llama / mistral / qwen2 / qwen3 / gemma3 families.

Layer parameters are stacked along a leading `layers` axis and the blocks run under `lax.scan`
(one compiled block, fast compiles, and on CPU faster than unrolling). Every parameter carries
logical axis names (`embed`, `heads`, `mlp`, `vocab`, ...) that `agora_jax.models.sharding` maps
onto a (data, fsdp, tensor) mesh.

Two entry points share one code path:
- `model(input_ids, attention_mask)` -> logits: the full-sequence forward, left padding handled as
  transformers does (positions from the mask);
- `model.forward(tokens, positions, cache, token_mask)` -> (logits, cache): the KV-cached step the
  sampling engine uses for prefill and decode.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from agora_jax.models.config import ModelConfig, RopeConfig
from agora_jax.models.sharding import MESH_AXES, logical_to_spec

Array = jax.Array
# (shape without the layer axis, logical axes, initializer name)
ParamSpec = tuple[tuple[int, ...], tuple[str | None, ...], str]


def layer_param_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    """The per-layer parameters of `cfg`, in our naming; stacked over layers in the model."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    norm = "zeros" if cfg.norm_offset else "ones"
    specs: dict[str, ParamSpec] = {
        "attn_norm": ((d,), (None,), norm),
        "q": ((d, q), ("embed", "heads"), "normal"),
        "k": ((d, kv), ("embed", "kv_heads"), "normal"),
        "v": ((d, kv), ("embed", "kv_heads"), "normal"),
        "o": ((q, d), ("heads", "embed"), "normal"),
        "mlp_norm": ((d,), (None,), norm),
        "gate": ((d, f), ("embed", "mlp"), "normal"),
        "up": ((d, f), ("embed", "mlp"), "normal"),
        "down": ((f, d), ("mlp", "embed"), "normal"),
    }
    if cfg.qkv_bias:
        specs.update(q_bias=((q,), (None,), "zeros"), k_bias=((kv,), (None,), "zeros"),
                     v_bias=((kv,), (None,), "zeros"))
    if cfg.o_bias:
        specs["o_bias"] = ((d,), (None,), "zeros")
    if cfg.mlp_bias:
        specs.update(gate_bias=((f,), (None,), "zeros"), up_bias=((f,), (None,), "zeros"),
                     down_bias=((d,), (None,), "zeros"))
    if cfg.qk_norm:
        specs.update(q_norm=((hd,), (None,), norm), k_norm=((hd,), (None,), norm))
    if cfg.sandwich_norms:
        specs.update(post_attn_norm=((d,), (None,), norm), post_mlp_norm=((d,), (None,), norm))
    return specs


def top_param_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    """Parameters outside the layer stack."""
    specs: dict[str, ParamSpec] = {
        "embed": ((cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), "normal"),
        "final_norm": ((cfg.hidden_size,), (None,), "zeros" if cfg.norm_offset else "ones"),
    }
    if not cfg.tie_embeddings:
        specs["lm_head"] = ((cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), "normal")
    return specs


def _init(kind: str, key: Array, shape: tuple[int, ...], dtype) -> Array:
    if kind == "normal":
        return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    return (jnp.zeros if kind == "zeros" else jnp.ones)(shape, dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer, `[layers, batch, max_len, kv_heads, head_dim]`.

    `valid[b, s]` marks slots that hold a real (non-pad) token; `index` is the next slot to write,
    shared by the batch (prompts are left-padded to a common length).
    """

    k: Array
    v: Array
    valid: Array
    index: Array

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


class Transformer(nnx.Module):
    """Decoder-only transformer; see the module docstring for the two entry points."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, remat: bool = False):
        self.config = config
        self.remat = remat  # rematerialise each block in the backward pass (training memory)
        dtype = jnp.dtype(config.param_dtype)
        with nnx.use_eager_sharding(False):
            for name, (shape, axes, init) in top_param_specs(config).items():
                setattr(self, name, nnx.Param(_init(init, rngs.params(), shape, dtype), out_sharding=axes))
            self.layers = nnx.Dict({
                name: nnx.Param(_init(init, rngs.params(), (config.num_layers, *shape), dtype),
                                out_sharding=("layers", *axes))
                for name, (shape, axes, init) in layer_param_specs(config).items()
            })

    # ------------------------------------------------------------------ public entry points

    def __call__(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
        """Logits `[B, T, V]` of a (left-padded) batch, as transformers computes them."""
        return self.logits(self.hidden_states(input_ids, attention_mask))

    def hidden_states(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
        """Final-norm hidden states `[B, T, D]` (for embeddings and chunked losses)."""
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        mask = attention_mask.astype(bool)
        positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
        slots = jnp.arange(input_ids.shape[1])
        x, _ = self._run(input_ids, positions, (_masks(slots, slots, mask, self.config.sliding_window), None), None)
        return x

    def forward(self, tokens: Array, positions: Array, cache: KVCache, token_mask: Array | None = None,
                window: int | None = None) -> tuple[Array, KVCache]:
        """KV-cached step: `tokens` attend to the cached slots and to each other (causally), are written
        at slots `cache.index ...`, and their logits are returned.

        `window` (static) bounds the cached slots read to the first `window`: a decode loop whose cache
        is mostly empty reads only the part written so far. It must be >= `cache.index`.
        """
        if token_mask is None:
            token_mask = jnp.ones(tokens.shape, bool)
        token_mask = token_mask.astype(bool)
        window = cache.max_len if window is None else min(window, cache.max_len)
        t = tokens.shape[1]
        q_slots = cache.index + jnp.arange(t)
        masks = (_masks(jnp.arange(t), jnp.arange(t), token_mask, self.config.sliding_window),
                 _masks(q_slots, jnp.arange(window), cache.valid[:, :window], self.config.sliding_window))
        x, (k, v) = self._run(tokens, positions, masks, (cache.k, cache.v), window)
        at = (0, 0, cache.index, 0, 0)
        cache = KVCache(jax.lax.dynamic_update_slice(cache.k, k, at),  # k, v already in the cache dtype
                        jax.lax.dynamic_update_slice(cache.v, v, at),
                        jax.lax.dynamic_update_slice(cache.valid, token_mask, (0, cache.index)),
                        cache.index + t)
        return self.logits(x), cache

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty cache for `batch` rows of up to `max_len` tokens (prompt + generation)."""
        c = self.config
        shape = (c.num_layers, batch, max_len, c.num_kv_heads, c.head_dim)
        zeros = jnp.zeros(shape, c.dtype)
        return KVCache(zeros, zeros, jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32))

    def logits(self, x: Array) -> Array:
        c = self.config
        head = self.embed[...].T if c.tie_embeddings else self.lm_head[...]
        out = jnp.matmul(x, head.astype(x.dtype), precision=matmul_precision(x.dtype))
        if c.final_logit_softcap:
            out = jnp.tanh(out / c.final_logit_softcap) * c.final_logit_softcap
        return out

    # ------------------------------------------------------------------ internals

    def _run(self, tokens, positions, masks, cache, window: int = 0):
        """Embed, run the layer stack under scan, final norm. Returns (hidden, the new keys and values
        `[layers, B, T, kv_heads, head_dim]` or None).

        `masks` are the `_masks` of the tokens over themselves and over the cached slots (or None);
        `cache` is None or the cached (keys, values) `[layers, B, S, kv_heads, head_dim]` the tokens
        also attend to.
        """
        c = self.config
        dtype = jnp.dtype(c.dtype)
        embed = self.embed[...]
        x = _batch_split((jnp.take(embed, tokens, axis=0) * jnp.asarray(c.embed_scale, embed.dtype)).astype(dtype))

        global_rope = _rope_cos_sin(c.rope, c.head_dim, positions, dtype)
        local_rope = _rope_cos_sin(c.local_rope, c.head_dim, positions, dtype) if c.local_rope else global_rope
        layer_params = {name: p[...] for name, p in self.layers.items()}
        sliding = jnp.asarray(c.sliding_layers)

        def block(x, xs):
            p, is_sliding, layer = xs
            cached = None
            if cache is not None:
                # This layer's first `window` slots, read by index rather than scanned over: under vmap (stacked
                # pools) scanned-over arrays must be layer-major, and the cache then could not keep its model
                # axis first, where its update after the scan is done in place.
                cached = tuple(jax.lax.dynamic_index_in_dim(a, layer, keepdims=False)[:, :window] for a in cache)
            mask = tuple(None if m is None else jnp.where(is_sliding, m[1], m[0]) for m in masks)
            cos, sin = jax.tree.map(lambda l, g: jnp.where(is_sliding, l, g), local_rope, global_rope)
            h = _rms_norm(x, p["attn_norm"], c)
            h, kv = _attention(p, h, cos, sin, mask, c, cached)
            if c.sandwich_norms:
                h = _rms_norm(h, p["post_attn_norm"], c)
            x = x + h
            h = _mlp(p, _rms_norm(x, p["mlp_norm"], c), c)
            if c.sandwich_norms:
                h = _rms_norm(h, p["post_mlp_norm"], c)
            return _batch_split(x + h), None if cached is None else kv

        if self.remat:
            block = jax.checkpoint(block)
        x, new_kv = jax.lax.scan(block, x, (layer_params, sliding, jnp.arange(c.num_layers)))
        return _rms_norm(x, self.final_norm[...], c), new_kv


def _masks(q_slots: Array, k_slots: Array, valid: Array, sliding_window: int | None) -> tuple[Array, Array]:
    """Which keys each query sees, `[B, T, S]`: causal over the slots holding real tokens (`valid`
    `[B, S]`), and the same within the sliding window (for sliding-window layers)."""
    causal = (k_slots[None, :] <= q_slots[:, None])[None] & valid[:, None, :]
    if sliding_window is None:
        return causal, causal
    return causal, causal & (k_slots[None, :] > q_slots[:, None] - sliding_window)[None]


def _batch_split(x: Array) -> Array:
    """Activations `[B, ...]` split over the batch's mesh axes (the `batch` rule) while a mesh is set
    (`jax.set_mesh`) and B divides over them. Without it XLA's propagation kept every row on every fsdp
    device (weights stationary, activations whole) and no 7B prefill fit a v5e slice (docs/tpu.md)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    (rows,) = logical_to_spec(("batch",), x.shape[:1], mesh)
    if rows is None:
        return x
    rest = (jax.sharding.PartitionSpec.UNCONSTRAINED,) * (x.ndim - 1)
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(rows, *rest))


def _rms_norm(x: Array, w: Array, c: ModelConfig) -> Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + c.rms_norm_eps)
    if c.norm_offset:  # gemma: scale in float32, then cast
        return (xf * (c.norm_offset + w.astype(jnp.float32))).astype(x.dtype)
    return w.astype(x.dtype) * xf.astype(x.dtype)  # llama: cast, then scale


def _rope_inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
    inv = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
    if rope.rope_type == "linear":
        return inv / rope.factor
    if rope.rope_type == "llama3":
        low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
        high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = 2 * np.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def _rope_cos_sin(rope: RopeConfig, head_dim: int, positions: Array, dtype) -> tuple[Array, Array]:
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(_rope_inv_freq(rope, head_dim))
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, head_dim]
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def matmul_precision(dtype) -> jax.lax.Precision:
    """float32 compute means float32 matmuls on every backend. XLA's default precision would take
    TF32 on NVIDIA GPUs since Ampere and bf16 passes on TPU, about 1e-3 away from transformers'
    float32; bfloat16 compute keeps the backend's fast path."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


def _apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def _dense(x: Array, p: dict[str, Array], name: str) -> Array:
    y = jnp.matmul(x, p[name].astype(x.dtype), precision=matmul_precision(x.dtype))
    bias = p.get(f"{name}_bias")
    return y if bias is None else y + bias.astype(x.dtype)


def _attention(p, x, cos, sin, masks, c: ModelConfig, cached):
    """Grouped-query attention of the tokens `x` over themselves and, when `cached = (keys, values)`
    `[B, S, kv_heads, head_dim]`, over those cached slots. `masks = (self [B, T, T], cached [B, T, S])`.
    Returns the output and the tokens' own (keys, values) for the caller to cache."""
    b, t, _ = x.shape
    groups = c.num_heads // c.num_kv_heads
    q = _dense(x, p, "q").reshape(b, t, c.num_heads, c.head_dim)
    k = _dense(x, p, "k").reshape(b, t, c.num_kv_heads, c.head_dim)
    v = _dense(x, p, "v").reshape(b, t, c.num_kv_heads, c.head_dim)
    if c.qk_norm:
        q, k = _rms_norm(q, p["q_norm"], c), _rms_norm(k, p["k_norm"], c)
    q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
    if cached is not None:  # keys/values are cached in the cache dtype: attend to what was stored
        k, v = k.astype(cached[0].dtype), v.astype(cached[1].dtype)
    elif implementation := fused_attention(x.dtype, c):
        # every row also sees itself: a left-padding row sees no key otherwise (NaN in the fused kernel;
        # real rows already see themselves, so their outputs are unchanged)
        mask = (masks[0] | jnp.eye(t, dtype=bool))[:, None]
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=c.scale, implementation=implementation)
        return _dense(_batch_split(out.reshape(b, t, -1)), p, "o"), (k, v)
    q = q.reshape(b, t, c.num_kv_heads, groups, c.head_dim)
    keys, values, mask = [k], [v], [masks[0]]
    if cached is not None and cached[0].shape[1]:
        keys, values, mask = [cached[0], k], [cached[1], v], [masks[1], masks[0]]
    scores = jnp.concatenate([_scores(q, key, c.scale) for key in keys], axis=-1)  # [b, kv, g, t, s]
    if c.attn_logit_softcap:
        scores = jnp.tanh(scores / c.attn_logit_softcap) * c.attn_logit_softcap
    scores = jnp.where(jnp.concatenate(mask, axis=-1)[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
    splits = np.cumsum([key.shape[1] for key in keys])[:-1]
    out = sum(_weighted(part, value) for part, value in zip(jnp.split(probs, splits, axis=-1), values))
    return _dense(_batch_split(out.reshape(b, t, -1)), p, "o"), (k, v)


def fused_attention(dtype, c: ModelConfig) -> str | None:
    """The `jax.nn.dot_product_attention` implementation of the full-sequence forward (training, scoring):
    "cudnn" (fused flash attention) when `AGORA_JAX_ATTENTION=cudnn` is set, on NVIDIA GPUs in 16-bit
    compute without logit soft-capping; else None, the einsum path, which materialises float32 scores
    `[B, heads, T, T]` in every layer (8 x 2048 tokens of a 0.5B model trained at half PyTorch's speed,
    BENCHMARKS.md). Opt-in until measured on a GPU (`benchmarks/gpu.sh` sets it; tests/test_attention.py
    checks it there); float32 compute always keeps the einsum path (parity with transformers to 1e-5)."""
    if (os.environ.get("AGORA_JAX_ATTENTION") == "cudnn" and jax.default_backend() == "gpu"
            and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and not c.attn_logit_softcap):
        return "cudnn"
    return None


def _scores(q: Array, k: Array, scale: float) -> Array:
    """Scaled float32 scores `[b, kv, g, t, s]` of queries `[b, t, kv, g, d]` against keys `[b, s, kv, d]`."""
    if q.shape[1] == 1:  # decoding: multiply-and-reduce fuses into one pass over the cache (XLA:CPU's batched dots do not)
        scores = jnp.sum(q.astype(jnp.float32) * k.astype(jnp.float32)[:, :, :, None, :], axis=-1)  # [b, s, kv, g]
        return jnp.transpose(scores, (0, 2, 3, 1))[:, :, :, None, :] * scale
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(q.dtype), precision=matmul_precision(q.dtype))
    return (scores * jnp.asarray(scale, q.dtype)).astype(jnp.float32)


def _weighted(probs: Array, v: Array) -> Array:
    """Attention output `[b, t, kv, g, d]` of weights `[b, kv, g, t, s]` over values `[b, s, kv, d]`."""
    v = v.astype(probs.dtype)
    if probs.shape[3] == 1:
        weights = jnp.transpose(probs[:, :, :, 0, :], (0, 3, 1, 2))  # [b, s, kv, g]
        return jnp.sum(weights[..., None] * v[:, :, :, None, :], axis=1)[:, None]
    return jnp.einsum("bkgts,bskd->btkgd", probs, v, precision=matmul_precision(probs.dtype))


_ACTIVATION_FNS: dict[str, Callable[[Array], Array]] = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def _mlp(p, x, c: ModelConfig) -> Array:
    hidden = _batch_split(_ACTIVATION_FNS[c.activation](_dense(x, p, "gate")) * _dense(x, p, "up"))
    return _dense(hidden, p, "down")
