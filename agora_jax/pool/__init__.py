"""The pool: its members, their weights (changed only through `Pool.update`), generation, scoring
and the weights digest. Depends on models and sampling only; strategies and the loop use it."""

from agora_jax.pool.digest import params_digest
from agora_jax.pool.pool import (Backend, Member, Message, Params, Pool, Request, load_params_into,
                                 params_of)
from agora_jax.pool.scoring import completion_logprobs

__all__ = ["Backend", "Member", "Message", "Params", "Pool", "Request", "completion_logprobs", "load_params_into",
           "params_digest", "params_of"]
