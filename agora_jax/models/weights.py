"""Checkpoint tensors (Hugging Face names and layouts) <-> `Transformer` parameters.

Loading builds the model abstractly (`nnx.eval_shape`), computes each parameter's target sharding,
and materialises it with `jax.make_array_from_callback`, so each device receives only its shard and
the host holds at most one parameter at a time. Export writes an HF directory that
`transformers.AutoModelForCausalLM.from_pretrained` loads.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from agora_jax.atomic import atomic_path, atomic_write_text
from agora_jax.models.config import ModelConfig
from agora_jax.models.errors import CheckpointError
from agora_jax.models.safetensors_io import write_safetensors
from agora_jax.models.sharding import DEFAULT_RULES, Rules, variable_sharding
from agora_jax.models.transformer import Transformer, layer_param_specs, top_param_specs

_LAYER_NAMES = {
    "attn_norm": "input_layernorm.weight",
    "post_attn_norm": "post_attention_layernorm.weight",
    "post_mlp_norm": "post_feedforward_layernorm.weight",
    "q_norm": "self_attn.q_norm.weight",
    "k_norm": "self_attn.k_norm.weight",
    **{p: f"self_attn.{p}_proj.weight" for p in "qkvo"},
    **{f"{p}_bias": f"self_attn.{p}_proj.bias" for p in "qkvo"},
    **{p: f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")},
    **{f"{p}_bias": f"mlp.{p}_proj.bias" for p in ("gate", "up", "down")},
}
_TOP_NAMES = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "lm_head": "lm_head.weight"}
# Our dense weights are [in, out]; transformers' nn.Linear weights are [out, in].
_TRANSPOSED = {"q", "k", "v", "o", "gate", "up", "down", "lm_head"}


class Checkpoint(Protocol):
    """What the loader needs from a checkpoint (safetensors directory or GGUF file)."""

    path: pathlib.Path
    hf_config: dict

    def tensor_names(self) -> list[str]: ...

    def get(self, hf_name: str) -> np.ndarray: ...


def hf_name(cfg: ModelConfig, name: str, layer: int | None = None) -> str:
    """The transformers state-dict name of our parameter `name` (of `layer`, for stacked ones)."""
    if layer is None:
        return _TOP_NAMES[name]
    if name == "mlp_norm":  # llama's "post_attention_layernorm" is the pre-MLP norm
        suffix = "pre_feedforward_layernorm.weight" if cfg.sandwich_norms else "post_attention_layernorm.weight"
    else:
        suffix = _LAYER_NAMES[name]
    return f"model.layers.{layer}.{suffix}"


def _expected_hf_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape[::-1] if name in _TRANSPOSED else shape


def load_weights(cfg: ModelConfig, checkpoint: Checkpoint, mesh: Mesh | None = None,
                 rules: Rules = DEFAULT_RULES) -> Transformer:
    """A `Transformer` for `cfg` holding `checkpoint`'s weights, sharded over `mesh` if given."""
    names = set(checkpoint.tensor_names())
    expected = {_TOP_NAMES[n] for n in top_param_specs(cfg)} | {
        hf_name(cfg, n, i) for n in layer_param_specs(cfg) for i in range(cfg.num_layers)}
    missing = sorted(expected - names)
    if missing:
        raise CheckpointError(f"{checkpoint.path}: tensor {missing[0]!r} is missing"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    dtype = np.dtype(jnp.dtype(cfg.param_dtype))

    def read(name: str, layer: int | None, shape: tuple[int, ...]) -> np.ndarray:
        key = hf_name(cfg, name, layer)
        tensor = checkpoint.get(key)
        if tuple(tensor.shape) != _expected_hf_shape(name, shape):
            raise CheckpointError(f"{checkpoint.path}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                                  f"the config expects {_expected_hf_shape(name, shape)}")
        return tensor.T if name in _TRANSPOSED else tensor

    def materialise(path: tuple, variable: nnx.Variable) -> nnx.Variable:
        name, layered = path[-1], path[0] == "layers"
        host: list[np.ndarray] = []

        def full() -> np.ndarray:  # built once per parameter, on first request
            if not host:
                if layered:
                    out = np.empty(variable.shape, dtype)
                    for i in range(cfg.num_layers):
                        out[i] = read(name, i, variable.shape[1:])
                else:
                    out = np.asarray(read(name, None, variable.shape), dtype)
                host.append(out)
            return host[0]

        sharding = variable_sharding(variable, mesh, rules) if mesh else SingleDeviceSharding(jax.devices()[0])
        return variable.replace(jax.make_array_from_callback(variable.shape, sharding, lambda idx: full()[idx]))

    flat = [(path, materialise(path, v)) for path, v in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def save_hf(model: Transformer, directory: str | os.PathLike, tokenizer=None) -> pathlib.Path:
    """Write `model` (and `tokenizer`) as a Hugging Face directory; files appear atomically."""
    cfg = model.config
    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(jnp.dtype(cfg.param_dtype))
    layers = dict(model.layers.items())
    params = {hf_name(cfg, n, None): (n, None) for n in top_param_specs(cfg)}
    params.update({hf_name(cfg, n, i): (n, i) for n in layer_param_specs(cfg) for i in range(cfg.num_layers)})

    def fetch(key: str) -> np.ndarray:
        name, layer = params[key]
        value = getattr(model, name)[...] if layer is None else layers[name][...][layer]
        value = np.asarray(jax.device_get(value))
        return value.T if name in _TRANSPOSED else value

    def shape(key: str) -> tuple[int, ...]:
        name, layer = params[key]
        full = getattr(model, name).shape if layer is None else layers[name].shape[1:]
        return _expected_hf_shape(name, tuple(full))

    with atomic_path(out / "model.safetensors") as tmp:
        write_safetensors(tmp, [(k, shape(k), dtype) for k in params], fetch)
    atomic_write_text(out / "config.json", json.dumps(cfg.to_hf(), indent=2))
    if tokenizer is not None:
        tokenizer.save(out)
    return out
