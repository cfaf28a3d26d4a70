"""`logit_fusion` (logit level): decode one answer per item from the weighted average of all members'
next-token logits at every step (`pool.fused_generate`; members share a vocabulary). The fused outputs
are the final answers and the distillation examples.

Settings (`defaults()`):
    weights   per-member logit weights; [] = equal (1/N each)
    sampling  decoding of the fused answer (`SamplingParams` fields)
"""

from __future__ import annotations

import jax
import ml_collections

from agora_jax.records import Result, Role, Turn
from agora_jax.strategies.base import Strategy, register, single_answer_result
from agora_jax.pool import Pool
from agora_jax.strategies.rounds import sampling_defaults, sampling_params
from agora_jax.tasks import Task


def defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(name="logit_fusion", weights=[], sampling=sampling_defaults()))


@register
class LogitFusion(Strategy):
    name = "logit_fusion"
    defaults = staticmethod(defaults)

    def run(self, pool: Pool, task: Task, split: str, rng: jax.Array) -> Result:
        items = task.split(split)
        weights = list(self.config.weights) or None
        outs = pool.fused_generate([it.messages for it in items], sampling_params(self.config.sampling, rng, 1),
                                   weights)
        tokenizer = pool[0].tokenizer
        finals = [Turn(item_id=it.id, model=self.name, round=1, role=Role.FUSE, prompt=list(it.messages),
                       output=out[0].text, prompt_tokens=len(tokenizer.encode_chat(it.messages)),
                       output_tokens=len(out[0].tokens), logprobs=[float(x) for x in out[0].logprobs])
                  for it, out in zip(items, outs)]
        return single_answer_result(self.name, items, finals, finals, {"weights": weights or "equal"}, fused=True)
