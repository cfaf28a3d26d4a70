"""Multiagent fine-tuning: debate + majority vote; every member trained on its own answers, by role.

Member j is debate agent j. Generation agents (`strategy.generation_agents`, default the first half of
the pool) learn from their own first-round answers that state the consensus; critic agents
(`strategy.critic_agents`, default the rest) from their own final-round answers that state it, a share
`strategy.corrected_fraction` (default 0.5) of them corrected ones (see
agora_jax/strategies/multiagent_finetuning.py).

Variants: default (tiny models trained here, synthetic task, CPU minutes), smollm2, qwen2.5-1.5b,
qwen2.5-7b, llama3.1-8b (see agora_jax/evolution/config.py). Usage:
    python launch/main.py --config=configs/multiagent_ft.py[:variant] [--config.rounds=1 ...]
"""

from agora_jax.evolution.config import base_config
from agora_jax.strategies.multiagent_finetuning import defaults


def get_config(variant=None):
    return base_config(variant, defaults())
