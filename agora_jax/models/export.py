"""LoRA adapters as PEFT adapter directories (the model itself leaves as an HF directory: `save_hf`).

A directory holds `adapter_config.json` (rank, alpha, target modules, the base model's path) and
`adapter_model.safetensors` with PEFT's tensor names, so `peft.PeftModel.from_pretrained(base, dir)`
(or `AutoPeftModelForCausalLM`, vLLM's `--lora-modules`) applies it to the base model. Our factors
`A [L, in, r]`, `B [L, r, out]` give `W_eff = W + (alpha / r) * A @ B` in our `[in, out]` layout;
PEFT's `lora_A.weight [r, in]` and `lora_B.weight [out, r]` are their per-layer transposes.
"""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np

from agora_jax.atomic import atomic_path, atomic_write_text
from agora_jax.models.config import ModelConfig
from agora_jax.models.safetensors_io import write_safetensors
from agora_jax.models.weights import hf_name

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def save_peft_adapter(config: ModelConfig, adapters: dict[str, dict[str, np.ndarray]], alpha: float,
                      directory: str | os.PathLike, base_model: str, dropout: float = 0.0) -> pathlib.Path:
    """Write `adapters` (`{target: {"a": [L, in, r], "b": [L, r, out]}}`, targets in our layer names:
    q, k, v, o, gate, up, down) as a PEFT LoRA directory whose base is `base_model` (a path or hub id)."""
    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    ranks = {ab["a"].shape[-1] for ab in adapters.values()}
    if len(ranks) != 1:
        raise ValueError(f"adapters of different ranks {sorted(ranks)}: one PEFT adapter has one rank")
    tensors: dict[str, np.ndarray] = {}
    for target, ab in adapters.items():
        for layer in range(config.num_layers):
            module = "base_model.model." + hf_name(config, target, layer).removesuffix(".weight")
            tensors[f"{module}.lora_A.weight"] = ab["a"][layer].T
            tensors[f"{module}.lora_B.weight"] = ab["b"][layer].T
    with atomic_path(out / ADAPTER_WEIGHTS) as tmp:
        write_safetensors(tmp, [(k, v.shape, np.float32) for k, v in tensors.items()], tensors.__getitem__)
    modules = sorted({hf_name(config, t, 0).split(".")[-2] for t in adapters})  # "q" -> "q_proj"
    settings = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": ranks.pop(), "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": modules,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
    }
    atomic_write_text(out / ADAPTER_CONFIG, json.dumps(settings, indent=2))
    return out
