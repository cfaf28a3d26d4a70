"""N same-architecture students trained by one compiled program (docs/method.md §3).

Every array of the train state gets a leading model axis; the step is `jax.vmap(train_step)`, so one
jitted call updates all N students, each on its own batch (`[N, B, T]`, from `distill_dataset` given
one example list per student, or `kd_batch` for logit KD) with its own optimizer state and dropout
key. A student whose batch has no loss token (padding) is left exactly as it was by that step.

`data.side_by_side_plans` + `kd_batch`: each student passes over its own examples only; one that runs
out first gets empty (zero-weight) batches, never repeats, and each row carries its teacher's weights.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from agora_jax.distill.data import Batch, Plan, Record, collate, stack_batches
from agora_jax.distill.trainer import Params, Teacher, TrainState, Trainer, full_params, train_step
from agora_jax.models import Transformer
from agora_jax.models.sharding import place, stack

PyTree = Any


def unstack(tree: PyTree) -> list[PyTree]:
    """Inverse of `stack` (on axis 0)."""
    n = jax.tree.leaves(tree)[0].shape[0]
    return [jax.tree.map(lambda x: x[i], tree) for i in range(n)]


def stack_models(models: Sequence[Transformer]) -> tuple[nnx.GraphDef, Params]:
    """One graph and the models' parameters stacked `[N, ...]` (same architecture required)."""
    graphdefs, states = zip(*(nnx.split(m) for m in models))
    if any(g != graphdefs[0] for g in graphdefs[1:]):
        raise ValueError("stacked models must share one architecture (and dtypes)")
    return graphdefs[0], stack([nnx.to_pure_dict(s) for s in states])


def teacher_pool(models: Sequence[Transformer]) -> Teacher:
    """The frozen pool whose fused (mean) logits are the KD target."""
    return Teacher(*stack_models(models))


def stacked_train_step(state: TrainState, frozen: Params, batch: Batch, teacher: Teacher | None, horizon: jax.Array,
                       **static) -> tuple[TrainState, dict[str, jax.Array]]:
    """`train_step` of every student at once: state, frozen, batch and schedule horizon `[N, ...]`; the
    teacher shared. A student without loss tokens in its batch keeps its state, step count included
    (Adam's momentum would move it), so padding steps leave it exactly where its own run ended."""
    def step(state: TrainState, frozen: Params, batch: Batch, teacher: Teacher | None, horizon: jax.Array):
        new, metrics = train_step(state, frozen, batch, teacher, horizon, **static)
        return jax.tree.map(lambda n, o: jnp.where(metrics["tokens"] > 0, n, o), new, state), metrics

    return jax.vmap(step, in_axes=(0, 0, 0, None, 0))(state, frozen, batch, teacher, horizon)


def kd_batch(records: Sequence[Sequence[Record]], mixes: Sequence[np.ndarray], plans: Sequence[Plan], step: int,
             pad_id: int) -> Batch:
    """This host's rows of step `step` of every student's plan, stacked `[N, B, T]`, plus each row's
    teacher weights `teacher_weights` `[N, B, P]` (`mixes[i][k]`: example k of student i; 0 on padding)."""
    batches, weights = [], []
    for recs, mix, plan in zip(records, mixes, plans):
        rows, length = plan[step]
        rows = np.split(rows, jax.process_count())[jax.process_index()]
        batches.append(collate(recs, rows, length, pad_id))
        weights.append(row_teacher_weights(mix, rows))
    return {**stack_batches(batches, pad_id), "teacher_weights": np.stack(weights)}


def row_teacher_weights(mix: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """`mix[k]` for every row k of a planned batch, `[B, P]`; zeros on its padding rows (-1)."""
    out = np.zeros((len(rows), mix.shape[1]), np.float32)
    out[rows >= 0] = mix[rows[rows >= 0]]
    return out


class StackedTrainer(Trainer):
    """Trains `models` (same architecture) at once. `num_steps`: one schedule length for all, or each
    student's own (its own run's `len(dataset)`); `seeds`: each student's (default `cfg.seed + i`)."""

    batch_axes = ("model", "batch", None)
    step_function = staticmethod(stacked_train_step)

    def __init__(self, models: Sequence[Transformer], cfg, num_steps: int | Sequence[int], *args,
                 seeds: Sequence[int] | None = None, **kwargs):
        if not models:
            raise ValueError("no students")
        self.seeds = list(seeds) if seeds is not None else [cfg.seed + i for i in range(len(models))]
        if len(self.seeds) != len(models) or (not isinstance(num_steps, int) and len(num_steps) != len(models)):
            raise ValueError(f"{len(models)} students need as many seeds and schedule lengths")
        super().__init__(list(models), cfg, num_steps, *args, **kwargs)

    def _horizon(self, num_steps: int | Sequence[int]) -> np.ndarray:
        steps = [num_steps] * len(self.seeds) if isinstance(num_steps, int) else list(num_steps)
        return np.stack([super(StackedTrainer, self)._horizon(n) for n in steps])

    def _init(self, models: list[Transformer]) -> tuple[nnx.GraphDef, TrainState, Params]:
        self.export_graphdef = nnx.graphdef(models[0])
        self.export_dtype = models[0].config.param_dtype
        parts = [self._init_one(m, seed) for m, seed in zip(models, self.seeds)]
        graphdefs, states, frozens = zip(*parts)
        if any(g != graphdefs[0] for g in graphdefs[1:]):
            raise ValueError("stacked students must share one architecture (and dtypes)")
        state, frozen = stack(states), stack(frozens)
        if self.mesh is not None:
            state, frozen = place((state, frozen), self._shardings(models[0], state, frozen, lead=(None,)))
        return graphdefs[0], state, frozen

    @property
    def num_students(self) -> int:
        return int(self.state.step.shape[0])

    def _merged_params(self) -> Params:
        return jax.vmap(functools.partial(full_params, cfg=self.cfg))(self.state.params, self.frozen)

    def export(self) -> list[Transformer]:
        """Every trained student as a plain `Transformer` (LoRA merged)."""
        return [nnx.merge(self.export_graphdef, p) for p in unstack(self.params())]
