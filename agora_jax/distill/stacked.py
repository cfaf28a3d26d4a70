"""N same-architecture students trained by one compiled program (METHOD.md §3).

Every array of the train state gets a leading model axis; the step is `jax.vmap(train_step)`, so one
jitted call updates all N students, each on its own batch (`[N, B, T]`, from `distill_dataset` given
one example list per student) with its own optimizer state and dropout key.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from agora_jax.distill.data import Batch
from agora_jax.distill.trainer import Params, Teacher, TrainState, Trainer, full_params, train_step
from agora_jax.models import Transformer

PyTree = Any


def stack(trees: Sequence[PyTree]) -> PyTree:
    """Stack same-structure pytrees on a new leading axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: PyTree) -> list[PyTree]:
    """Inverse of `stack`."""
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


def stacked_train_step(state: TrainState, frozen: Params, batch: Batch, teacher: Teacher | None,
                       **static) -> tuple[TrainState, dict[str, jax.Array]]:
    """`train_step` of every student at once: state, frozen and batch `[N, ...]`; the teacher shared."""
    return jax.vmap(functools.partial(train_step, **static), in_axes=(0, 0, 0, None))(state, frozen, batch, teacher)


class StackedTrainer(Trainer):
    """Trains `models` (same architecture) at once; student i's seed is `cfg.seed + i`."""

    batch_axes = ("model", "batch", None)
    step_function = staticmethod(stacked_train_step)

    def __init__(self, models: Sequence[Transformer], *args, **kwargs):
        if not models:
            raise ValueError("no students")
        super().__init__(list(models), *args, **kwargs)

    def _init(self, models: list[Transformer]) -> tuple[nnx.GraphDef, TrainState, Params]:
        self.export_graphdef = nnx.graphdef(models[0])
        self.export_dtype = models[0].config.param_dtype
        parts = [self._init_one(m, self.cfg.seed + i) for i, m in enumerate(models)]
        graphdefs, states, frozens = zip(*parts)
        if any(g != graphdefs[0] for g in graphdefs[1:]):
            raise ValueError("stacked students must share one architecture (and dtypes)")
        state, frozen = stack(states), stack(frozens)
        if self.mesh is not None:
            state, frozen = jax.device_put((state, frozen), self._shardings(models[0], state, frozen, lead=(None,)))
        return graphdefs[0], state, frozen



    @property
    def num_students(self) -> int:
        return int(self.state.step.shape[0])

    def _merged_params(self) -> Params:
        return jax.vmap(functools.partial(full_params, cfg=self.cfg))(self.state.params, self.frozen)

    def export(self) -> list[Transformer]:
        """Every trained student as a plain `Transformer` (LoRA merged)."""
        return [nnx.merge(self.export_graphdef, p) for p in unstack(self.params())]
