"""AGORA group distillation: peer verification, shared memory of validated solutions, elite peers
(`--config.strategy.elite_mode=draw|weight`: learn only from the elite agents, or weight them up).

Variants: default (tiny models trained here, synthetic task, CPU minutes), smollm2, qwen2.5-1.5b,
qwen2.5-7b, llama3.1-8b (see agora_jax/evolution/config.py). Usage:
    python launch/main.py --config=configs/agora.py[:variant] [--config.rounds=1 ...]
"""

from agora_jax.evolution.config import base_config
from agora_jax.strategies.agora import defaults


def get_config(variant=None):
    return base_config(variant, defaults())
