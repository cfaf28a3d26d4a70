"""Mixture-of-Agents: layers of proposers, an aggregator writes the final answer.

Variants: default (tiny models trained here, synthetic task, CPU minutes), smollm2, qwen2.5-1.5b,
qwen2.5-7b, llama3.1-8b (see agora_jax/evolution/config.py). Usage:
    python launch/main.py --config=configs/moa.py[:variant] [--config.rounds=1 ...]
"""

from agora_jax.evolution.config import base_config
from agora_jax.strategies.moa import defaults


def get_config(variant=None):
    return base_config(variant, defaults())
