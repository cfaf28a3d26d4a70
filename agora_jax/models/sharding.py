"""Logical axis names -> mesh axes (MaxText style rules) on a (data, fsdp, tensor) mesh.

Parameters name their axes logically (`embed`, `heads`, `mlp`, `vocab`, ...); `DEFAULT_RULES` maps
those to mesh axes. A mesh axis that does not divide a dimension is dropped for that parameter
(replicated instead), so any model runs on any mesh.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("layers", None),
    ("model", None),  # the stacked-pool axis
    # LoRA's rank axis takes fsdp where its weight's other axis does not (B's output, o's input on the
    # tensor axis): without it those adapters and their Adam moments sat whole on every fsdp device
    ("lora_rank", "fsdp"),
)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one entry may be -1 to take the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    shape = [data, fsdp, tensor]
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one axis may be -1")
    if -1 in shape:
        known = int(np.prod([s for s in shape if s != -1]))
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh shape data={shape[0]} fsdp={shape[1]} tensor={shape[2]} "
                         f"does not use the {len(devices)} devices")
    grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Rules = DEFAULT_RULES) -> PartitionSpec:
    """PartitionSpec for a tensor with logical `axes`; mesh axes that do not divide are dropped."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape):
        target = table.get(name) if name is not None else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        kept = []
        for axis in targets:
            size = mesh.shape[axis]
            if axis in used or size == 1 or dim % (size * int(np.prod([mesh.shape[a] for a in kept]))):
                continue
            kept.append(axis)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


def variable_sharding(variable: nnx.Variable, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    axes = variable.get_metadata().get("out_sharding") or (None,) * len(variable.shape)
    return NamedSharding(mesh, logical_to_spec(axes, variable.shape, mesh, rules))


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.State:
    """A State of NamedShardings mirroring `state` (concrete or abstract)."""
    return jax.tree.map(lambda v: v.replace(variable_sharding(v, mesh, rules)), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def is_abstract(tree: Any) -> bool:
    """Whether `tree` (arrays, nnx modules) holds abstract arrays (`jax.ShapeDtypeStruct`, as from
    `nnx.eval_shape`) rather than values."""
    leaves = jax.tree.leaves(tree)
    return bool(leaves) and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)


def shaped(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)`, or its abstract result (`nnx.eval_shape`) when the arguments are abstract: one code
    path builds both the real state and the abstract one that ahead-of-time compilation lowers
    (`agora_jax.compile`), never materialising weights."""
    return nnx.eval_shape(fn, *args) if is_abstract(args) else fn(*args)


def stack(trees: Sequence[Any], axis: int = 0) -> Any:
    """Same-structure pytrees stacked leaf by leaf on a new `axis` (abstract trees: the abstract stacked
    tree). The one stacker of model copies: a stacked pool's parameters (`sampling.stack_states`, the
    model axis after the layer axis) and the trainer's stacked students (`distill.stacked`, axis 0)."""
    return shaped(lambda *ts: jax.tree.map(lambda *xs: jnp.stack(xs, axis=axis), *ts), *trees)


def place(tree: Any, shardings: Any) -> Any:
    """`jax.device_put(tree, shardings)`; abstract arrays get the shardings attached instead."""
    if is_abstract(tree):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
    return jax.device_put(tree, shardings)


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.Module:
    """Place every parameter of `model` on `mesh` according to its logical axes (in place)."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh, rules)
    nnx.update(model, jax.device_put(state, shardings))
    return model
