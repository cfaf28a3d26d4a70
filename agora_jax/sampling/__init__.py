"""Batched sampling: one compiled prefill + decode loop per call, for one model, a stacked pool of
same-architecture models, or a logit-fused pool.

    engine = Engine(model, tokenizer)
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=256, temperature=0.7, top_p=0.9, n=4))
    pool = PoolEngine(models, tokenizers)
    outs = pool.generate(prompts_per_model, params)       # out[model][prompt][sample]
    fused = pool.fused_generate(prompts, params, weights)  # logit fusion, out[prompt][sample]
"""

from agora_jax.sampling.engine import Engine, encode_prompt
from agora_jax.sampling.params import Completion, Prompt, SamplingParams
from agora_jax.sampling.pool import PoolEngine, stack_states
from agora_jax.sampling.sampler import filter_logits, select_tokens

__all__ = ["Completion", "Engine", "PoolEngine", "Prompt", "SamplingParams", "encode_prompt", "filter_logits",
           "select_tokens", "stack_states"]
