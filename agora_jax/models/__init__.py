"""Models: one Flax NNX transformer family, weights in and out, tokenizers, an offline registry.

    model, tokenizer = agora_jax.models.load("smollm2-135m-instruct")
    logits = model(input_ids, attention_mask)          # [B, T, V], left padding as transformers

`name_or_path` is a registry name (`REGISTRY`), an HF directory, a `.gguf` file, or an HF hub id.
"""

from __future__ import annotations

import logging
import os
import pathlib

from flax import nnx
from jax.sharding import Mesh

from agora_jax.models.config import ModelConfig, RopeConfig
from agora_jax.models.errors import CheckpointError, UnsupportedModelError
from agora_jax.models.registry import REGISTRY
from agora_jax.models.safetensors_io import SafetensorsCheckpoint
from agora_jax.models.sharding import DEFAULT_RULES, Rules, make_mesh, shard_model
from agora_jax.models.tokenizer import Tokenizer, tiny_tokenizer
from agora_jax.models.transformer import KVCache, Transformer
from agora_jax.models.weights import load_weights, save_hf

__all__ = [
    "CheckpointError", "KVCache", "ModelConfig", "PRESETS", "REGISTRY", "RopeConfig", "Tokenizer", "Transformer",
    "UnsupportedModelError", "create", "load", "make_mesh", "preset", "save_hf", "shard_model", "tiny_tokenizer",
]

log = logging.getLogger(__name__)

# Small configs for tests and CPU exploration; vocab 264 covers `tiny_tokenizer()` (261 ids).
PRESETS: dict[str, dict] = {
    "tiny": dict(family="llama", vocab_size=264, hidden_size=64, intermediate_size=128, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=16, rope=RopeConfig(theta=10000.0), tie_embeddings=True,
                 bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "small": dict(family="llama", vocab_size=264, hidden_size=128, intermediate_size=384, num_layers=4,
                  num_heads=4, num_kv_heads=2, head_dim=32, rope=RopeConfig(theta=10000.0), tie_embeddings=True,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A named small config (`PRESETS`), with fields overridden."""
    if name not in PRESETS:
        raise UnsupportedModelError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


def create(config: ModelConfig | str, seed: int = 0, mesh: Mesh | None = None,
           rules: Rules = DEFAULT_RULES) -> Transformer:
    """A randomly initialised model (a config or a preset name), sharded over `mesh` if given."""
    config = preset(config) if isinstance(config, str) else config
    model = Transformer(config, rngs=nnx.Rngs(seed))
    return shard_model(model, mesh, rules) if mesh is not None else model


def _resolve(name_or_path: str | os.PathLike) -> pathlib.Path:
    if str(name_or_path) in REGISTRY:
        from agora_jax.models.registry import resolve

        return resolve(str(name_or_path))
    path = pathlib.Path(name_or_path).expanduser()
    if path.exists():
        return path
    if str(name_or_path).count("/") == 1 and not str(name_or_path).startswith((".", "/")):
        from huggingface_hub import snapshot_download

        try:
            return pathlib.Path(snapshot_download(
                str(name_or_path), allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja"]))
        except Exception as e:  # no hub here, gated repo, typo: say which
            raise CheckpointError(f"{name_or_path}: not a local path or registry name, and the hub download "
                                  f"failed ({type(e).__name__}: {e})") from e
    raise CheckpointError(f"{name_or_path}: no such file or directory, registry name ({', '.join(REGISTRY)}) "
                          f"or hub id")


def load(name_or_path: str | os.PathLike, dtype: str = "float32", mesh: Mesh | None = None,
         compute_dtype: str | None = None, rules: Rules = DEFAULT_RULES) -> tuple[Transformer, Tokenizer | None]:
    """Load a model and its tokenizer. `dtype` is the parameter dtype, `compute_dtype` the activations'.

    The tokenizer is None for an HF directory that ships no tokenizer files.
    """
    path = _resolve(name_or_path)
    if path.suffix == ".gguf":
        from agora_jax.models.gguf import GGUFCheckpoint

        checkpoint = GGUFCheckpoint(path)
        tokenizer: Tokenizer | None = Tokenizer(checkpoint.tokenizer())
    else:
        checkpoint = SafetensorsCheckpoint(path)
        has_tokenizer = any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
        tokenizer = Tokenizer.from_pretrained(path) if has_tokenizer else None
        if tokenizer is None:
            log.warning("%s has no tokenizer files; returning the model only", path)
    config = ModelConfig.from_hf(checkpoint.hf_config, param_dtype=dtype, dtype=compute_dtype)
    return load_weights(config, checkpoint, mesh, rules), tokenizer
