"""Collaboration strategies: one module each, one registry (`STRATEGIES`), one interface (`Strategy.run`).

Importing the package registers every built-in strategy; a new strategy is one module with a
`@register`-ed `Strategy` subclass plus its import line below.
"""

from agora_jax.records import DistillExample, Result, Role, Turn
from agora_jax.strategies.answers import majority_vote, weighted_vote
from agora_jax.strategies.base import STRATEGIES, Strategy, make_strategy, read_transcript, register, write_transcript
from agora_jax.strategies import (agora, dare_ties, debate, graph_router, llm_blender, logit_fusion, moa,  # noqa: F401
                                  multiagent_finetuning, multiagent_refine, self_consistency, trained_router,
                                  weight_average)

__all__ = ["STRATEGIES", "DistillExample", "Result", "Role", "Strategy", "Turn", "make_strategy", "majority_vote",
           "read_transcript", "register", "weighted_vote", "write_transcript"]
