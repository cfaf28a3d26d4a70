"""Trained router: a pool LM fine-tuned (LoRA) on dev to name the best model per question
(`--config.strategy.router=mlp`: a classification head on question embeddings instead).

Variants: default (tiny models trained here, synthetic task, CPU minutes), smollm2, qwen2.5-1.5b,
qwen2.5-7b, llama3.1-8b (see agora_jax/evolution/config.py). Usage:
    python launch/main.py --config=configs/trained_router.py[:variant] [--config.rounds=1 ...]
"""

from agora_jax.evolution.config import base_config
from agora_jax.strategies.trained_router import defaults


def get_config(variant=None):
    return base_config(variant, defaults())
