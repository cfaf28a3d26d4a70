"""`Pool.update` is the one way a member's weights change: the engines sample with the new weights
at their next call, without a refresh anyone must remember and without compiling again."""

from __future__ import annotations

from agora_jax.models import create, tiny_tokenizer
from agora_jax.pool import Member, Pool
from agora_jax.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8)
PROMPTS = [[{"role": "user", "content": q}] for q in ("3+4=", "12+9=", "7+7=")]


def outputs(pool: Pool, member: int, *, alone: bool) -> list[tuple[float, ...]]:
    """The log-probabilities of member `member`'s greedy replies (random tiny models reply with
    whitespace, their log-probabilities tell them apart), through its own engine (`alone`) or the
    stacked pool engine."""
    if alone:
        outs = pool.engine(member).generate(PROMPTS, GREEDY)
    else:
        outs = pool.generate([(m, p) for m in range(len(pool)) for p in PROMPTS], GREEDY)
        outs = outs[member * len(PROMPTS):(member + 1) * len(PROMPTS)]
    return [tuple(c[0].logprobs) for c in outs]


def test_update_changes_what_every_engine_samples_without_compiling_again():
    tok = tiny_tokenizer()
    pool = Pool([Member(f"m{i}", create("tiny", seed=i), tok) for i in range(3)])
    before = {alone: [outputs(pool, m, alone=alone) for m in range(3)] for alone in (True, False)}
    assert before[True][0] != before[True][2]  # different weights, different replies
    compilations = pool.engine().num_compilations, pool.engine(2).num_compilations
    digest = pool.weights_digest()

    pool.update("m2", pool.params("m0"))  # m2 now holds m0's weights
    for alone in (False, True):
        assert outputs(pool, 2, alone=alone) == before[alone][0]
        assert [outputs(pool, m, alone=alone) for m in (0, 1)] == before[alone][:2]
    assert (pool.engine().num_compilations, pool.engine(2).num_compilations) == compilations
    assert pool.weights_digest() != digest
