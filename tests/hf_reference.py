"""The numerical reference: tiny random transformers (PyTorch) models of every supported family, and
transformers' own conversion of the registry's real GGUF checkpoints."""

from __future__ import annotations

import functools
import pathlib

import numpy as np
import torch
import transformers

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2)

# name -> (config class, extra config fields); each exercises one family's distinguishing features.
FAMILIES: dict[str, tuple[type, dict]] = {
    "llama": (transformers.LlamaConfig, dict(tie_word_embeddings=True)),
    "llama3_rope_bias": (transformers.LlamaConfig, dict(
        attention_bias=True, mlp_bias=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "llama_linear_rope": (transformers.LlamaConfig, dict(
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})),
    "mistral": (transformers.MistralConfig, dict(sliding_window=5)),
    "qwen2": (transformers.Qwen2Config, dict()),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=32, tie_word_embeddings=True)),
    "gemma3": (transformers.Gemma3TextConfig, dict(
        head_dim=32, sliding_window=4, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
}


def make_hf_model(family: str, directory: pathlib.Path | None = None, seed: int = 0,
                  max_shard_size: str | None = None, **overrides) -> transformers.PreTrainedModel:
    """A random fp32 model of `family`, weights perturbed away from init (norms, biases included),
    saved with `save_pretrained` into `directory` when given."""
    config_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**{**COMMON, **extra, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    if directory is not None:
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(directory, **kwargs)
    return model


def left_padded_batch(vocab: int = 128, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three rows of 11 tokens, two of them left-padded (4 and 7 pads)."""
    ids = np.random.RandomState(seed).randint(3, vocab, (3, 11))
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :7] = 0
    return ids, mask


def torch_logits(model: transformers.PreTrainedModel, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.float().numpy()


@functools.cache
def gguf_reference(name: str) -> transformers.PreTrainedModel:
    """transformers' fp32 model of registry checkpoint `name`, converted from the GGUF file we load.
    Converting is the costly part of a real-model parity test (~100 s for Gemma-3-270M on a 2-core
    CPU), so the tests of one process share one copy; they only read it (eval mode, no grad)."""
    from agora_jax.models.registry import resolve

    path = resolve(name)
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
