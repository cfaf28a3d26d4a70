"""Trainer checkpoints with Orbax: the train state, the grain iterator position and a JSON record.

One save holds `state` (params, optimizer, step, dropout key; `StandardSave`), `data` (the data
iterator, `grain.checkpoint.CheckpointSave`) and `meta` (`JsonSave`), so a run restored from any step,
mid-epoch included, continues exactly as if it had not stopped. Saves are asynchronous.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from agora_jax.distill.trainer import TrainState


class Checkpointer:
    """Keeps the last `max_to_keep` saves of one training run under `directory`."""

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 2):
        self.manager = ocp.CheckpointManager(
            os.path.abspath(directory), options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, iterator: grain.DatasetIterator,
             meta: dict[str, Any] | None = None) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(iterator),
            meta=ocp.args.JsonSave({"step": step, **(meta or {})})))

    def restore(self, like: TrainState, iterator: grain.DatasetIterator, step: int | None = None) -> TrainState:
        """The state saved at `step` (default: latest), placed like `like`; `iterator` is repositioned."""
        step = self.latest_step() if step is None else step
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract),
            data=grain.checkpoint.CheckpointRestore(iterator),
            meta=ocp.args.JsonRestore()))
        return restored.state

    def meta(self, step: int | None = None) -> dict[str, Any]:
        step = self.latest_step() if step is None else step
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
