"""One strategy round: its sampling settings and seeds, and `ask` (requests -> one `Pool.generate`
call -> one `Turn` per generated message)."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from agora_jax.pool import Message, Pool
from agora_jax.sampling import Completion, SamplingParams
from agora_jax.records import Role, Turn

from agora_jax.tasks import Example


def seed_ints(rng: jax.Array, n: int) -> list[int]:
    """`n` host integers drawn from a JAX key: the per-call seeds of a strategy run."""
    return [int(s) for s in np.asarray(jax.random.randint(rng, (n,), 0, 2**31 - 1))]



def sampling_defaults() -> ml_collections.ConfigDict:
    """`config.sampling` of every text strategy: the reference code's T=0.7, top_p=0.9, 512 tokens."""
    return ml_collections.ConfigDict(dict(temperature=0.7, top_p=0.9, top_k=0, min_p=0.0, max_new_tokens=512))


def sampling_params(cfg: ml_collections.ConfigDict, rng: jax.Array, round: int, **overrides: Any) -> SamplingParams:
    """SamplingParams from `cfg` (a `sampling_defaults()` dict) with a seed drawn from `rng` folded
    with `round`, so every round of a run samples with its own reproducible seed."""
    seed = seed_ints(jax.random.fold_in(rng, round), 1)[0]
    return SamplingParams(**{**cfg.to_dict(), "seed": seed, **overrides})


def ask(pool: Pool, requests: Sequence[tuple[str, int, list[Message]]], params: SamplingParams, *,
        round: int, role: Role, transcript: list[Turn]) -> list[list[Completion]]:
    """One strategy round: every (item id, member, messages) request in one `pool.generate` call,
    one `Turn` per generated message appended to `transcript`."""
    outs = pool.generate([(member, messages) for _, member, messages in requests], params)
    for (item_id, member, messages), completions in zip(requests, outs):
        prompt_tokens = len(pool[member].tokenizer.encode_chat(messages))
        for c in completions:
            transcript.append(Turn(item_id=item_id, model=pool.names[member], round=round, role=role,
                                   prompt=list(messages), output=c.text, prompt_tokens=prompt_tokens,
                                   output_tokens=len(c.tokens),
                                   logprobs=None if c.logprobs is None else [float(x) for x in c.logprobs]))
    return outs


def answer_items(pool: Pool, members: Sequence[int], items: Sequence[Example], params: SamplingParams, *,
                 round: int, transcript: list[Turn], role: Role = Role.ANSWER) -> list[Turn]:
    """Item k answered by member `members[k]` (one `generate` call, `params.n` must be 1); returns the
    new turns, also appended to `transcript`."""
    start = len(transcript)
    ask(pool, [(it.id, int(m), it.messages) for it, m in zip(items, members)], params, round=round, role=role,
        transcript=transcript)
    return transcript[start:]
