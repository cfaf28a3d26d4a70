"""Architectures of the models the configs name, without their weights.

The hub variants (`configs/*.py:qwen2.5-1.5b`, `qwen2.5-7b`, `llama3.1-8b`) name Hugging Face hub ids.
`HUB_CONFIGS` holds those models' `config.json` values as published (the fields `ModelConfig.from_hf`
reads), so their programs can be built and compiled where no hub is reachable: `architecture(name)`
gives the `ModelConfig`, `abstract_model(config)` the model as abstract arrays (`nnx.eval_shape`:
shapes, dtypes and logical axes; no weight is ever materialised).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from flax import nnx

from agora_jax.models.config import ModelConfig
from agora_jax.models.errors import UnsupportedModelError
from agora_jax.models.transformer import Transformer

_QWEN2_7B = dict(
    model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
    num_attention_heads=28, num_key_value_heads=4, hidden_act="silu", rms_norm_eps=1e-6, tie_word_embeddings=False,
    use_sliding_window=False, max_window_layers=28, bos_token_id=151643, eos_token_id=151645,
)

# config.json of each model (architecture fields and special token ids), as published on the hub.
HUB_CONFIGS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen2.5-1.5B-Instruct": dict(
        model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=32768, tie_word_embeddings=True, use_sliding_window=False, sliding_window=32768,
        max_window_layers=21, bos_token_id=151643, eos_token_id=151645,
    ),
    "Qwen/Qwen2.5-7B-Instruct": dict(_QWEN2_7B, rope_theta=1000000.0, max_position_embeddings=32768,
                                     sliding_window=131072),
    "Qwen/Qwen2-7B-Instruct": dict(_QWEN2_7B, rope_theta=1000000.0, max_position_embeddings=32768,
                                   sliding_window=131072),
    "Qwen/Qwen2.5-Math-7B-Instruct": dict(_QWEN2_7B, rope_theta=10000.0, max_position_embeddings=4096,
                                          sliding_window=4096),
    "meta-llama/Llama-3.1-8B-Instruct": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, hidden_act="silu", rms_norm_eps=1e-5,
        rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=False, attention_bias=False,
        mlp_bias=False, bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
    ),
    # the registry's GGUF checkpoint (configs/*.py:smollm2), readable without fetching it
    "smollm2-135m-instruct": dict(
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, hidden_act="silu", rms_norm_eps=1e-5,
        rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    ),
}


def hf_config(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """The `config.json` dict of a local HF directory or `.gguf` file, else of a model in `HUB_CONFIGS`."""
    path = pathlib.Path(name_or_path).expanduser()
    if (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text())
    if path.suffix == ".gguf" and path.is_file():
        from agora_jax.models.gguf import GGUFCheckpoint

        return GGUFCheckpoint(path).hf_config
    if str(name_or_path) in HUB_CONFIGS:
        return dict(HUB_CONFIGS[str(name_or_path)])
    raise UnsupportedModelError(f"{name_or_path}: no local config.json or .gguf, and not a model whose shapes are "
                                f"known here ({', '.join(HUB_CONFIGS)})")


def architecture(name_or_path: str | os.PathLike, param_dtype: str = "float32",
                 dtype: str | None = None) -> ModelConfig:
    """The `ModelConfig` `agora_jax.models.load(name_or_path, param_dtype, dtype)` would build."""
    return ModelConfig.from_hf(hf_config(name_or_path), param_dtype=param_dtype, dtype=dtype)


def abstract_model(config: ModelConfig) -> Transformer:
    """The model of `config` as abstract arrays (`jax.ShapeDtypeStruct` leaves): nothing is allocated."""
    return nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
