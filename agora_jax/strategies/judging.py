"""A judge's verdict among options (A/B, Yes/No): by likelihood or by sampled replies."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from agora_jax.pool import Message, Pool
from agora_jax.sampling import SamplingParams
from agora_jax.strategies import prompts
from agora_jax.records import Role, Turn

from agora_jax.strategies.rounds import ask


JUDGE_MODES = ("likelihood", "generate")  # `choose`'s modes: a strategy's `judge` setting


def choose(pool: Pool, requests: Sequence[tuple[str, int, list[Message]]], options: Sequence[str], *, mode: str,
           params: SamplingParams, round: int, role: Role, transcript: list[Turn]) -> list[np.ndarray]:
    """A judgment among `options` (e.g. "A"/"B", "Yes"/"No") per (item id, member, messages) request,
    as probabilities over the options.

    mode "likelihood": the member's likelihood of starting its reply with each option, normalised
    over the options (one batched forward; the Turn's logprobs are the options' log-likelihoods);
    mode "generate": `params.n` sampled replies, each read by its first word (a reply naming no
    option counts as uniform)."""
    if mode == "likelihood":
        flat = pool.score_batch([(m, msgs, o) for _, m, msgs in requests for o in options], whole_turn=False)
        out = []
        for k, (item_id, member, messages) in enumerate(requests):
            ll = np.asarray(flat[k * len(options):(k + 1) * len(options)])
            out.append(np.exp(ll - np.logaddexp.reduce(ll)))
            transcript.append(Turn(item_id=item_id, model=pool.names[member], round=round, role=role,
                                   prompt=list(messages), output=options[int(np.argmax(ll))],
                                   prompt_tokens=len(pool[member].tokenizer.encode_chat(messages)),
                                   logprobs=[float(x) for x in ll]))
        return out
    if mode != "generate":
        raise ValueError(f"judgment mode must be 'likelihood' or 'generate', got {mode!r}")
    out = []
    for completions in ask(pool, requests, params, round=round, role=role, transcript=transcript):
        probs = np.zeros(len(options))
        for c in completions:
            pick = prompts.first_option(c.text, options)
            probs += np.full(len(options), 1 / len(options)) if pick is None else np.eye(len(options))[pick]
        out.append(probs / len(completions))
    return out
