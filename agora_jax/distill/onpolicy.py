"""On-policy KD: sample continuations and distil them into every student, in one jitted function.

One call of `OnPolicyTrainer.step_on_policy(prompt_ids, prompt_mask, key, teacher_weights, row_weights)`:
1. samples `num_new` tokens per prompt, either from the teacher pool (each row from its own mix of the
   pool's members, `teacher_weights`: the fused pool, i.e. logit fusion, or one model) or from each
   student itself (vmapped over students);
2. trains every student toward its rows' teacher distribution on the sampled tokens (`train_step`
   with the KD objective, vmapped over students; `row_weights` scale rows, 0 marks padding).
Prompts `[B, P]` are shared by every student (sampled from the teacher once), `[N, B, P]` are each
student's own.
Sampling is the sampling package's decoder (`sampling.sampler`, the trainer's stacked params read on
their leading axis): temperature sampling, stop tokens end a row (later tokens are masked out of
attention and loss).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from agora_jax.distill.data import Batch
from agora_jax.distill.stacked import StackedTrainer, stacked_train_step
from agora_jax.distill.trainer import DistillConfig, Params, Teacher, TrainState, full_params
from agora_jax.models import Tokenizer, Transformer
from agora_jax.records import DistillExample, pair
from agora_jax.sampling import sampler

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    num_new: int = 64
    temperature: float = 0.7  # 0: greedy
    source: Literal["pool", "student"] = "pool"  # who writes the sequences: the teacher pool or the student
    stop_ids: tuple[int, ...] = ()


def prompt_batch(tok: Tokenizer, prompts: Sequence[DistillExample | str], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded chat prompts `[B, length]` (ids, mask), formatted as for generation."""
    rows = [tok.encode_chat(pair(p, "").messages if isinstance(p, str) else p.messages) for p in prompts]
    if max(map(len, rows)) > length:
        raise ValueError(f"a prompt has {max(map(len, rows))} tokens, more than length={length}")
    ids = np.full((len(rows), length), tok.pad_id, np.int32)
    mask = np.zeros((len(rows), length), bool)
    for i, r in enumerate(rows):
        ids[i, length - len(r):] = r
        mask[i, length - len(r):] = True
    return ids, mask


def sample(graphdef: nnx.GraphDef, pool_params: Params, prompt_ids: Array, prompt_mask: Array, key: Array,
           cfg: SamplingConfig, teacher_weights: Array | None = None) -> Batch:
    """Continue left-padded prompts from the fused logits of the pool `[P, ...]` (P=1: one model),
    each row `b` from the pool's logits weighted by `teacher_weights[b]` (`[B, P]`; None: uniform), with
    the sampling package's decoder (`sampling.sampler`: prefill, the decode loop, stop handling).

    Returns a training batch over prompt + continuation: targets are next tokens and `loss_weights`
    select the sampled ones (up to and including a stop token).
    """
    b, p = prompt_ids.shape
    size = jax.tree.leaves(pool_params)[0].shape[0]
    mix = jnp.full((b, size), 1.0 / size, jnp.float32) if teacher_weights is None else teacher_weights
    decoder = sampler.fused_decoder([(graphdef, size)], "logits", leading=True)
    params = {"members": (pool_params,), "weights": mix.T}  # [P, B]: a mix per row
    vocab = nnx.merge(graphdef, jax.tree.map(lambda x: x[0], pool_params)).config.vocab_size
    greedy = cfg.temperature == 0
    knobs = sampler.Knobs(temperature=jnp.float32(cfg.temperature if not greedy else 1.0), top_k=jnp.int32(0),
                          top_p=jnp.float32(1.0), min_p=jnp.float32(0.0),
                          is_stop=jnp.zeros((vocab,), bool).at[jnp.asarray(cfg.stop_ids, jnp.int32)].set(True),
                          max_new=jnp.int32(cfg.num_new))
    seeds = jax.random.randint(key, (b,), 0, jnp.iinfo(jnp.int32).max)
    state = sampler.prefill(decoder, params, prompt_ids, prompt_mask, seeds, jnp.zeros((b,), jnp.int32), knobs,
                            max_new=cfg.num_new, greedy=greedy)
    state = sampler.decode(decoder, params, state, knobs, prompt_len=p, greedy=greedy)
    live = jnp.arange(cfg.num_new) < state.lengths[:, None]  # through the stop token
    ids = jnp.concatenate([prompt_ids, state.tokens], axis=1)
    sampled = jnp.concatenate([jnp.zeros((b, p), bool), live], axis=1)
    return {
        "input_ids": ids,
        "attention_mask": jnp.concatenate([prompt_mask, live], axis=1),
        "targets": jnp.concatenate([ids[:, 1:], jnp.zeros((b, 1), jnp.int32)], axis=1),
        "loss_weights": jnp.concatenate([sampled[:, 1:], jnp.zeros((b, 1), bool)], axis=1).astype(jnp.float32),
    }


def onpolicy_step(state: TrainState, frozen: Params, teacher: Teacher, prompt_ids: Array, prompt_mask: Array,
                  teacher_weights: Array, row_weights: Array, key: Array, horizon: Array, *, graphdef: nnx.GraphDef,
                  cfg: DistillConfig, sampling: SamplingConfig) -> tuple[TrainState, tuple[dict[str, Array], Batch]]:
    """Sample (from the teacher pool, or from each stacked student) and take one KD step for every
    student. Prompts, teacher weights `[M, B, P]` and row weights `[M, B]`: M=1 shared, M=N per student;
    `horizon` `[N, 2]`: each student's schedule (`StackedTrainer`)."""
    n = state.step.shape[0]
    broadcast = functools.partial(jax.tree.map, lambda x: jnp.broadcast_to(x, (n, *x.shape[1:])))
    if sampling.source == "pool":
        def teacher_sample(ids: Array, mask: Array, mix: Array, key: Array) -> Batch:
            return sample(teacher.graphdef, teacher.params, ids, mask, key, sampling, mix)

        batch = broadcast(jax.vmap(teacher_sample)(prompt_ids, prompt_mask, teacher_weights,
                                                   jax.random.split(key, prompt_ids.shape[0])))
    elif sampling.source == "student":
        def own_sample(trainable: Params, base: Params, ids: Array, mask: Array, key: Array) -> Batch:
            params = jax.tree.map(lambda x: x[None], full_params(trainable, base, cfg))  # a pool of one
            return sample(graphdef, params, ids, mask, key, sampling)

        ids, mask = broadcast((prompt_ids, prompt_mask))
        batch = jax.vmap(own_sample)(state.params, frozen, ids, mask, jax.random.split(key, n))
    else:
        raise ValueError(f"unknown sampling source {sampling.source!r}; use pool or student")
    teacher_weights, row_weights = broadcast((teacher_weights, row_weights))
    batch = {**batch, "loss_weights": batch["loss_weights"] * row_weights[..., None],
             "teacher_weights": teacher_weights}
    state, metrics = stacked_train_step(state, frozen, batch, teacher, horizon, graphdef=graphdef, cfg=cfg)
    return state, (metrics, batch)


class OnPolicyTrainer(StackedTrainer):
    """Stacked students distilled on-policy toward the (per-row) fused distribution of `teacher`."""

    def __init__(self, models: Sequence[Transformer], cfg: DistillConfig, num_steps: int, *, teacher: Teacher,
                 sampling: SamplingConfig = SamplingConfig(), **kwargs):
        super().__init__(models, cfg.replace(objective="kd"), num_steps, teacher=teacher, **kwargs)
        self.sampling = sampling
        self._onpolicy = self.compile(onpolicy_step, sampling=sampling)

    def step_on_policy(self, prompt_ids: np.ndarray, prompt_mask: np.ndarray, key: Array,
                       teacher_weights: np.ndarray | None = None,
                       row_weights: np.ndarray | None = None) -> tuple[dict, Batch]:
        """One sample-then-distil step on left-padded prompts `[B, P]` (shared) or `[N, B, P]` (each
        student's), with each row's teacher weights `[(N,) B, P_teacher]` (None: the uniform pool) and
        weight `[(N,) B]` (None: 1); returns metrics and the samples."""
        ids = jnp.asarray(prompt_ids)
        ids = ids.reshape(-1, *ids.shape[-2:])  # [M, B, P], M = 1: shared
        m, rows = ids.shape[:2]
        size = jax.tree.leaves(self.teacher.params)[0].shape[0]
        mix = (jnp.full((m, rows, size), 1.0 / size) if teacher_weights is None
               else jnp.asarray(teacher_weights, jnp.float32).reshape(m, rows, size))
        weight = jnp.ones((m, rows)) if row_weights is None else jnp.asarray(row_weights, jnp.float32).reshape(m, rows)
        self.state, (metrics, batch) = self._onpolicy(self.state, self.frozen, self.teacher, ids,
                                                      jnp.asarray(prompt_mask).reshape(ids.shape), mix, weight, key,
                                                      self.horizon)
        return jax.device_get(metrics), jax.device_get(batch)
