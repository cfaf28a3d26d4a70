"""DARE-TIES weight merging (average or particle-swarm-optimised merge weights).

Variants: default (tiny models trained here, synthetic task, CPU minutes), smollm2, qwen2.5-1.5b,
qwen2.5-7b, llama3.1-8b (see agora_jax/evolution/config.py). Usage:
    python launch/main.py --config=configs/dare_ties.py[:variant] [--config.rounds=1 ...]

Task vectors need a common base (docs/method.md §1): the scratch pool of the default variant trains
every member from one shared initialisation (`pool.shared_init`); pools of copies of one checkpoint
(smollm2, qwen2.5-1.5b, llama3.1-8b) use that checkpoint; qwen2.5-7b pools three different models
and is refused unless `--config.strategy.base=` names the checkpoint they were fine-tuned from.
"""

from agora_jax.evolution.config import base_config
from agora_jax.strategies.dare_ties import defaults


def get_config(variant=None):
    config = base_config(variant, defaults())
    config.pool.shared_init = config.pool.kind == "scratch"
    return config
