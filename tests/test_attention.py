"""The fused attention of the full-sequence forward (`transformer.fused_attention`: cuDNN flash attention
on NVIDIA GPUs in 16-bit compute) computes what the einsum path computes.

On every backend the wiring is checked through `jax.nn.dot_product_attention`'s XLA implementation
(same mask, grouped queries, scale, left padding, sliding windows) against the einsum path in float32;
on a GPU, cuDNN's kernel in bfloat16 against the einsum path in bfloat16, logits and gradients."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from agora_jax.models import create, preset
from agora_jax.models import transformer

# left-padded rows of different lengths: padding rows see no key but themselves
IDS = np.array([[0, 0, 0, 5, 9, 12, 7, 3], [4, 8, 15, 16, 23, 42, 11, 6]], np.int32)
MASK = IDS != 0
CONFIGS = {
    "gqa": preset("tiny"),
    "sliding": dataclasses.replace(preset("tiny"), sliding_window=3, sliding_layers=(True, False)),
}


def _logits(model, implementation, monkeypatch) -> np.ndarray:
    monkeypatch.setattr(transformer, "fused_attention", lambda dtype, c: implementation)
    return np.asarray(jax.jit(lambda m: m(IDS, MASK))(model).astype(jnp.float32))


@pytest.mark.parametrize("name", CONFIGS)
def test_fused_attention_equals_the_einsum_path(name, monkeypatch):
    model = create(CONFIGS[name], seed=3)
    einsum = _logits(model, None, monkeypatch)
    fused = _logits(model, "xla", monkeypatch)
    np.testing.assert_allclose(fused[MASK], einsum[MASK], atol=1e-5, rtol=1e-5)
    assert np.isfinite(fused).all()  # padding rows too


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
def test_cudnn_attention_matches_the_einsum_path_in_bfloat16(monkeypatch):
    config = dataclasses.replace(preset("tiny"), head_dim=64, hidden_size=256, num_heads=4, num_kv_heads=2,
                                 dtype="bfloat16")
    model = create(config, seed=3)
    monkeypatch.setenv("AGORA_JAX_ATTENTION", "cudnn")
    assert transformer.fused_attention(jnp.bfloat16, config) == "cudnn"
    fused = _logits(model, "cudnn", monkeypatch)
    einsum = _logits(model, None, monkeypatch)
    assert np.isfinite(fused).all()
    np.testing.assert_allclose(fused[MASK], einsum[MASK], atol=0.05, rtol=0.05)  # bf16 scores and sums

    def loss(params, implementation):
        monkeypatch.setattr(transformer, "fused_attention", lambda dtype, c: implementation)
        logits = nnx.merge(nnx.graphdef(model), params)(IDS, MASK).astype(jnp.float32)
        return jnp.sum(jnp.where(MASK[..., None], jax.nn.log_softmax(logits), 0.0)[..., 7])

    params = nnx.state(model)
    grads = [jax.tree.leaves(jax.grad(loss)(params, impl)) for impl in ("cudnn", None)]
    for g_fused, g_einsum in zip(*grads):
        scale = float(jnp.max(jnp.abs(g_einsum.astype(jnp.float32)))) + 1e-6
        assert float(jnp.max(jnp.abs((g_fused - g_einsum).astype(jnp.float32)))) <= 0.05 * scale
