"""LoRA on the stacked layer weights: `W_eff[l] = W[l] + (alpha / rank) * A[l] @ B[l]`.

The adapters are a separate pytree `{target: {"a": [L, in, r], "b": [L, r, out]}}` (targets among
q, k, v, o, gate, up, down); the base weights are never changed. The model runs on the effective
weights, so no model code knows about LoRA, and `merge` produces the plain model for export;
`factor` recovers an adapter from the update a merge made (to export it as a PEFT adapter).

Dropout: the model computes `x @ W_eff`, so the adapter path has no input of its own to drop; we
drop input features of `A` instead (a fresh mask per layer and micro-step, shared by its tokens).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from agora_jax.models import ModelConfig, Transformer
from agora_jax.models.sharding import DEFAULT_RULES, Rules, logical_to_spec
from agora_jax.models.transformer import layer_param_specs

Array = jax.Array
Adapters = dict[str, dict[str, Array]]
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """The reference code's adapter: rank 64, alpha 16, dropout 0.1 on the attention projections."""

    rank: int = 64
    alpha: float = 16.0
    dropout: float = 0.1
    targets: tuple[str, ...] = ("q", "k", "v", "o")

    def __post_init__(self):
        unknown = set(self.targets) - set(LORA_TARGETS)
        if unknown:
            raise ValueError(f"LoRA targets {sorted(unknown)} unknown; choose from {LORA_TARGETS}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def init_adapters(config: ModelConfig, lora: LoRAConfig, key: Array, dtype=jnp.float32) -> Adapters:
    """`A` uniform in +-1/sqrt(in) (peft's kaiming init), `B` zero: the adapted model starts as the base."""
    specs = layer_param_specs(config)
    adapters = {}
    for name, k in zip(lora.targets, jax.random.split(key, len(lora.targets))):
        (d_in, d_out), _, _ = specs[name]
        bound = 1.0 / math.sqrt(d_in)
        adapters[name] = {
            "a": jax.random.uniform(k, (config.num_layers, d_in, lora.rank), dtype, -bound, bound),
            "b": jnp.zeros((config.num_layers, lora.rank, d_out), dtype),
        }
    return adapters


def adapter_shardings(config: ModelConfig, adapters: Adapters, mesh: Mesh,
                      rules: Rules = DEFAULT_RULES) -> dict[str, dict[str, NamedSharding]]:
    """`A` sharded like its weight's input axis, `B` like its output axis, and the rank axis over the
    mesh axis those leave free (the `lora_rank` rule)."""
    specs = layer_param_specs(config)
    out = {}
    for name, ab in adapters.items():
        _, (in_axis, out_axis), _ = specs[name]
        axes = {"a": ("layers", in_axis, "lora_rank"), "b": ("layers", "lora_rank", out_axis)}
        out[name] = {k: NamedSharding(mesh, logical_to_spec(axes[k], v.shape, mesh, rules)) for k, v in ab.items()}
    return out


def delta(adapter: dict[str, Array], scale: float) -> Array:
    """The per-layer weight update `scale * A @ B`, `[L, in, out]`, in float32."""
    return scale * jnp.einsum("lir,lro->lio", adapter["a"].astype(jnp.float32), adapter["b"].astype(jnp.float32),
                              precision=jax.lax.Precision.HIGHEST)


def factor(update: np.ndarray, rank: int, scale: float) -> dict[str, np.ndarray]:
    """The inverse of `delta`: factors `{"a": [L, in, r], "b": [L, r, out]}` (float32) whose
    `scale * A @ B` is the rank-`rank` truncated SVD of `update` `[L, in, out]`, the singular values
    split evenly between A and B. The SVD is taken inside the span of `update @ probe` for 2 * rank
    random probes (a randomized range finder, Halko et al. 2011), so a 4096-wide layer costs a
    fraction of a second. A merged adapter's update has rank at most `rank`: its factors come back
    up to the rounding of the weights it was merged into."""
    m = np.asarray(update, np.float64) / scale
    probe = np.random.default_rng(0).standard_normal((m.shape[0], m.shape[2], min(2 * rank, *m.shape[1:])))
    basis = np.linalg.qr(m @ probe)[0]  # [L, in, 2r]: orthonormal, spans the update's columns
    u, s, vt = np.linalg.svd(basis.swapaxes(1, 2) @ m, full_matrices=False)
    root = np.sqrt(s[:, :rank])
    return {"a": ((basis @ u)[:, :, :rank] * root[:, None, :]).astype(np.float32),
            "b": (root[:, :, None] * vt[:, :rank, :]).astype(np.float32)}


def apply(params: dict, adapters: Adapters, lora: LoRAConfig, dropout_key: Array | None = None) -> dict:
    """Model params (pure dict) with the adapted layer weights in float32; dropout when a key is given."""
    layers = dict(params["layers"])
    keys = jax.random.split(dropout_key, len(adapters)) if dropout_key is not None else [None] * len(adapters)
    for (name, adapter), key in zip(adapters.items(), keys):
        if key is not None and lora.dropout > 0:
            a = adapter["a"]
            keep = jax.random.bernoulli(key, 1.0 - lora.dropout, a.shape[:2])
            adapter = {**adapter, "a": a * (keep[..., None] / (1.0 - lora.dropout)).astype(a.dtype)}
        layers[name] = layers[name].astype(jnp.float32) + delta(adapter, lora.scale)
    return {**params, "layers": layers}


def merge(model: Transformer, adapters: Adapters, lora: LoRAConfig) -> Transformer:
    """A new model whose weights are `W + scale * A @ B`, cast to the model's parameter dtype."""
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    merged = apply(params, adapters, lora)
    dtype = jnp.dtype(model.config.param_dtype)
    merged["layers"] = {k: v.astype(dtype) for k, v in merged["layers"].items()}
    return nnx.merge(graphdef, merged)
