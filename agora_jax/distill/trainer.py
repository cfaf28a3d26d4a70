"""Distil one student: supervised KD (cross-entropy on completions) or logit KD toward a teacher pool.

The step is one pure function, `train_step(state, frozen, batch, teacher)`: gradient accumulation
over micro-batches (a `lax.scan`), global-norm clipping and AdamW with warmup + cosine, jitted with
the state donated and, on a mesh, every array sharded by its logical axes. `StackedTrainer`
(stacked.py) vmaps the same function over N students, `onpolicy.py` wraps it with sampling.

Full fine-tuning trains the model parameters; with LoRA the trainable parameters are the adapters
and the base weights ride along unchanged in `frozen` (never donated, never checkpointed).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
from typing import Any, Literal, NamedTuple

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from agora_jax.distill import lora as lora_lib
from agora_jax.distill.data import Batch, DataConfig
from agora_jax.distill.losses import Divergence, chunked_token_loss, cross_entropy, divergence
from agora_jax.models import Transformer
from agora_jax.models.sharding import DEFAULT_RULES, Rules, logical_to_spec, place, shaped, state_shardings
from agora_jax.sampling.sampler import fuse

Array = jax.Array
PyTree = Any
Params = dict[str, Any]
HEAD_NAMES = ("embed", "lm_head")  # the parameters `Transformer.logits` reads

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Training settings; the defaults are the paper reference code's (lr 1e-5, warmup 0.1, cosine,
    effective batch 16, 1 epoch, LoRA r=64 alpha=16 dropout 0.1 on q/k/v/o)."""

    data: DataConfig = DataConfig()
    learning_rate: float = 1e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    micro_batch_size: int | None = None  # rows per forward/backward; None: the whole batch (no accumulation)
    lora: lora_lib.LoRAConfig | None = lora_lib.LoRAConfig()  # None: full fine-tuning
    objective: Literal["ce", "kd"] = "ce"  # kd needs a teacher pool
    divergence: Divergence = "forward_kl"
    kd_temperature: float = 1.0
    kd_top_k: int | None = None
    compute_dtype: str = "float32"  # activations (bfloat16 for mixed precision)
    param_dtype: str = "float32"  # stored model weights (the frozen base under LoRA)
    master_weights: bool = True  # trainable parameters and their optimizer state in float32
    remat: bool = True  # recompute each layer block in the backward pass
    loss_chunk: int = 256  # positions per chunk of the vocabulary-sized loss
    seed: int = 0

    def replace(self, **changes: Any) -> DistillConfig:
        return dataclasses.replace(self, **changes)

    def accum_steps(self, batch_rows: int) -> int:
        micro = self.micro_batch_size or batch_rows
        if batch_rows % micro:
            raise ValueError(f"batch of {batch_rows} rows does not split into micro-batches of {micro}")
        return batch_rows // micro


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Everything a step changes: the checkpointed training state."""

    step: Array
    params: PyTree  # the trainable parameters: the model's (pure dict) or the LoRA adapters
    opt_state: PyTree
    rng: Array  # dropout key


class Teacher(NamedTuple):
    """A pool of same-architecture models whose fused logits are the KD target; params `[P, ...]`.
    A batch's optional `teacher_weights` `[B, P]` fuse each row's own mix of them (one member, the
    merged model, the whole pool); without it every row's target is the pool's uniform mean."""

    graphdef: nnx.GraphDef
    params: Params


def schedule_horizon(cfg: DistillConfig, num_steps: int) -> np.ndarray:
    """(warmup steps, total steps) of a training run of `num_steps` steps, as `int32[2]`: the schedule's
    two numbers, an argument of the step (a stacked student's own run; no recompile per length)."""
    warmup = int(round(cfg.warmup_ratio * num_steps))
    return np.asarray([warmup, max(num_steps, warmup + 1)], np.int32)


def learning_rate_schedule(cfg: DistillConfig, horizon: Array | np.ndarray) -> optax.Schedule:
    """Linear warmup from 0 to the peak over `horizon[0]` steps, then cosine decay to 0 at `horizon[1]`:
    `optax.warmup_cosine_decay_schedule`'s numbers (to float rounding: XLA turns optax's division by a
    constant into a multiplication), with a traced horizon, so steps of any length share one program."""
    warmup, total = (jnp.asarray(h, jnp.int32) for h in (horizon[0], horizon[1]))
    peak = cfg.learning_rate

    def schedule(count: Array) -> Array:
        rising = (0.0 - peak) * (1 - jnp.clip(count, 0, warmup) / warmup) + peak
        decay = (total - warmup).astype(jnp.float32)
        cosine = 0.5 * (1 + jnp.cos(jnp.pi * jnp.minimum(count - warmup, decay) / decay))
        return jnp.where(count < warmup, rising, peak * cosine)

    return schedule


def make_optimizer(cfg: DistillConfig, horizon: Array | np.ndarray) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW on the warmup + cosine schedule of `horizon` (`schedule_horizon`)."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm),
        optax.adamw(learning_rate_schedule(cfg, horizon), cfg.adam_b1, cfg.adam_b2, cfg.adam_eps,
                    weight_decay=cfg.weight_decay))


def split_model(model: Transformer, cfg: DistillConfig) -> tuple[nnx.GraphDef, Params]:
    """Graph (with the compute dtype and remat of `cfg`) and parameters (in `cfg.param_dtype`)."""
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, state)  # leaves the caller's model untouched
    copy.config = copy.config.replace(dtype=cfg.compute_dtype, param_dtype=cfg.param_dtype)
    copy.remat = cfg.remat
    graphdef, state = nnx.split(copy)
    params = jax.tree.map(lambda x: x.astype(cfg.param_dtype), nnx.to_pure_dict(state))
    return graphdef, params


def init_trainable(params: Params, cfg: DistillConfig, key: Array, model_config) -> tuple[PyTree, Params]:
    """(trainable, frozen): the model params and `{}`, or fresh LoRA adapters and the model params."""
    dtype = jnp.float32 if cfg.master_weights else jnp.dtype(cfg.param_dtype)
    if cfg.lora is None:  # a copy: the step donates it, and the caller's model must stay intact
        return jax.tree.map(lambda x: jnp.array(x, dtype, copy=True), params), {}
    return lora_lib.init_adapters(model_config, cfg.lora, key, dtype), params


def full_params(trainable: PyTree, frozen: Params, cfg: DistillConfig, dropout_key: Array | None = None) -> Params:
    """The model's parameters as the forward pass uses them (LoRA applied when configured)."""
    if cfg.lora is None:
        return trainable
    return lora_lib.apply(frozen, trainable, cfg.lora, dropout_key)


def _split_head(params: Params, trainable: bool) -> tuple[Params, Params]:
    """(head, rest): the LM head gets gradients from the chunked loss only when it is trained."""
    if not trainable:
        return {}, params
    head = {k: v for k, v in params.items() if k in HEAD_NAMES}
    return head, {k: v for k, v in params.items() if k not in HEAD_NAMES}


def _ce_chunk(graphdef: nnx.GraphDef, head: Params, h: Array, data: tuple[Array, Array], rest: Params) -> Array:
    targets, weights = data
    logits = nnx.merge(graphdef, {**rest, **head}).logits(h)
    return jnp.sum(cross_entropy(logits, targets) * weights)


def _kd_chunk(graphdef: nnx.GraphDef, teacher_graphdef: nnx.GraphDef, cfg: DistillConfig, head: Params, h: Array,
              data: tuple[Array, Array, Array], consts: tuple[Params, Params]) -> Array:
    teacher_h, weights, mix = data  # teacher_h: [chunk, P, D], mix: [chunk, P]
    rest, teacher_params = consts
    logits = nnx.merge(graphdef, {**rest, **head}).logits(h)
    pool_logits = jax.vmap(lambda p, th: nnx.merge(teacher_graphdef, p).logits(th), in_axes=(0, 1))(
        teacher_params, teacher_h)
    fused = fuse(pool_logits, mix.T, "logits")  # each token's own mix
    per_token = divergence(logits, fused, cfg.divergence, cfg.kd_temperature, cfg.kd_top_k)
    return jnp.sum(per_token * weights)


def teacher_hidden(teacher: Teacher, batch: Batch) -> Array:
    """Final hidden states of every pool member, `[B * T, P, D]`, without gradients."""
    h = jax.vmap(lambda p: nnx.merge(teacher.graphdef, p).hidden_states(batch["input_ids"], batch["attention_mask"]))(
        teacher.params)
    return jax.lax.stop_gradient(jnp.moveaxis(h.reshape(h.shape[0], -1, h.shape[-1]), 0, 1))


def teacher_mix(teacher: Teacher, batch: Batch) -> Array:
    """Every token's weights over the teacher pool, `[B * T, P]`: its row's `teacher_weights`, or uniform."""
    rows, length = batch["input_ids"].shape
    size = jax.tree.leaves(teacher.params)[0].shape[0]
    mix = batch.get("teacher_weights", jnp.full((rows, size), 1.0 / size, jnp.float32))
    return jnp.repeat(mix.astype(jnp.float32), length, axis=0)


def objective(trainable: PyTree, frozen: Params, batch: Batch, teacher: Teacher | None, dropout_key: Array | None,
              *, graphdef: nnx.GraphDef, cfg: DistillConfig) -> tuple[Array, Array]:
    """(summed token loss, summed token weight) of one micro-batch."""
    params = full_params(trainable, frozen, cfg, dropout_key)
    h = nnx.merge(graphdef, params).hidden_states(batch["input_ids"], batch["attention_mask"])
    h = h.reshape(-1, h.shape[-1])
    weights = batch["loss_weights"].reshape(-1).astype(jnp.float32)
    head, rest = _split_head(params, trainable=cfg.lora is None)
    if cfg.objective == "ce":
        fn, data, consts = functools.partial(_ce_chunk, graphdef), (batch["targets"].reshape(-1), weights), rest
    elif cfg.objective == "kd":
        if teacher is None:
            raise ValueError("objective='kd' needs a teacher pool")
        fn = functools.partial(_kd_chunk, graphdef, teacher.graphdef, cfg)
        data, consts = (teacher_hidden(teacher, batch), weights, teacher_mix(teacher, batch)), (rest, teacher.params)
    else:
        raise ValueError(f"unknown objective {cfg.objective!r}; use ce or kd")
    return chunked_token_loss(fn, head, h, data, consts, cfg.loss_chunk), jnp.sum(weights)


def train_step(state: TrainState, frozen: Params, batch: Batch, teacher: Teacher | None, horizon: Array, *,
               graphdef: nnx.GraphDef, cfg: DistillConfig) -> tuple[TrainState, dict[str, Array]]:
    """One optimizer step on one batch `[B, T]`, accumulated over micro-batches, on the learning-rate
    schedule of `horizon` (`schedule_horizon`)."""
    tx, schedule = make_optimizer(cfg, horizon), learning_rate_schedule(cfg, horizon)
    rows = batch["input_ids"].shape[0]
    accum = cfg.accum_steps(rows)
    rng, step_key = jax.random.split(state.rng)
    grad_fn = jax.value_and_grad(
        functools.partial(objective, graphdef=graphdef, cfg=cfg), has_aux=True)
    dropout_keys = jax.random.split(step_key, accum) if cfg.lora is not None and cfg.lora.dropout > 0 else None
    if accum == 1:
        (loss, weight), grads = grad_fn(state.params, frozen, batch, teacher,
                                        None if dropout_keys is None else dropout_keys[0])
    else:
        # micro-batch k holds rows k, k + accum, ...: a sharded batch axis stays sharded
        micro = jax.tree.map(lambda x: x.reshape(rows // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch)

        def accumulate(carry, xs):
            mb, key = xs
            (loss, weight), grads = grad_fn(state.params, frozen, mb, teacher, key)
            return jax.tree.map(jnp.add, carry, (loss, weight, grads)), None

        zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params))
        (loss, weight, grads), _ = jax.lax.scan(accumulate, zeros, (micro, dropout_keys))
    denominator = jnp.maximum(weight, 1e-6)
    grads = jax.tree.map(lambda g, p: (g / denominator).astype(p.dtype), grads, state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss / denominator, "tokens": weight, "grad_norm": optax.global_norm(grads),
               "learning_rate": schedule(state.step)}
    return TrainState(state.step + 1, params, opt_state, rng), metrics


@functools.lru_cache(maxsize=64)
def _jit_donating(fn, state_shardings: tuple | None, static: tuple):
    out_shardings = None if state_shardings is None else (jax.tree.unflatten(state_shardings[1], state_shardings[0]),
                                                           None)
    return jax.jit(functools.partial(fn, **dict(static)), donate_argnums=0, out_shardings=out_shardings)


class Trainer:
    """Distils one student (`Transformer`): `step(batch)`, `fit(dataset, ...)`, `export()`.

    `num_steps` sets the schedule (use `len(dataset)`); `mesh` shards parameters by their logical
    axes and batches over (data, fsdp); `teacher` is the pool for `objective='kd'`.
    """

    batch_axes: tuple[str | None, ...] = ("batch", None)
    step_function = staticmethod(train_step)

    def __init__(self, model: Transformer, cfg: DistillConfig, num_steps: int, *,
                 mesh: Mesh | None = None, teacher: Teacher | None = None, rules: Rules = DEFAULT_RULES):
        self.cfg, self.mesh, self.rules, self.teacher = cfg, mesh, rules, teacher
        self.horizon = self._horizon(num_steps)
        self.tx = make_optimizer(cfg, self.horizon.reshape(-1, 2)[0])  # its state's structure: the same for any horizon
        self.graphdef, self.state, self.frozen = self._init(model)
        self.state_shardings = jax.tree.map(lambda x: x.sharding, self.state) if mesh is not None else None
        self._step = self.compile(self.step_function)

    # ------------------------------------------------------------------ construction (overridden by StackedTrainer)

    def _horizon(self, num_steps: int) -> np.ndarray:
        return schedule_horizon(self.cfg, num_steps)

    def _init(self, model: Transformer) -> tuple[nnx.GraphDef, TrainState, Params]:
        self.export_graphdef = nnx.graphdef(model)  # the student as given: its own dtypes, no remat
        self.export_dtype = model.config.param_dtype
        graphdef, state, frozen = self._init_one(model, self.cfg.seed)
        if self.mesh is not None:
            state, frozen = place((state, frozen), self._shardings(model, state, frozen))
        return graphdef, state, frozen

    def _init_one(self, model: Transformer, seed: int) -> tuple[nnx.GraphDef, TrainState, Params]:
        """(graphdef, state, frozen) of one student; abstract (shapes only) for an abstract model, so a
        trainer of an `nnx.eval_shape` model holds the state its steps are compiled for ahead of time."""
        def init(model: Transformer) -> tuple[nnx.GraphDef, TrainState, Params]:
            graphdef, params = split_model(model, self.cfg)
            lora_key, dropout_key = jax.random.split(jax.random.PRNGKey(seed))
            trainable, frozen = init_trainable(params, self.cfg, lora_key, model.config)
            state = TrainState(jnp.zeros((), jnp.int32), trainable, self.tx.init(trainable), dropout_key)
            return graphdef, state, frozen

        return shaped(init, model)

    def _shardings(self, model: Transformer, state: TrainState, frozen: Params, lead: tuple = ()) -> tuple:
        """NamedShardings of (state, frozen) on the mesh; `lead` prepends axes (the stacked model axis)."""
        mesh = self.mesh

        def widen(s: NamedSharding) -> NamedSharding:
            return NamedSharding(mesh, PartitionSpec(*lead, *s.spec))

        def unstacked(tree: PyTree) -> PyTree:  # one student's shapes (only shapes and structure are read)
            return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[len(lead):], x.dtype), tree)

        model_shardings = nnx.to_pure_dict(state_shardings(nnx.state(model), mesh, self.rules))
        if self.cfg.lora is None:
            param_shardings, frozen_shardings = model_shardings, {}
        else:
            param_shardings = lora_lib.adapter_shardings(model.config, unstacked(state.params), mesh, self.rules)
            frozen_shardings = model_shardings
        replicated = NamedSharding(mesh, PartitionSpec())
        opt_shardings = optax.tree_map_params(self.tx, lambda _, s: s, unstacked(state.opt_state), param_shardings,
                                              transform_non_params=lambda _: replicated)
        state_shard = TrainState(replicated, param_shardings, opt_shardings, replicated)
        return jax.tree.map(widen, (state_shard, frozen_shardings))

    def compile(self, fn, **static):
        """`fn(state, ..., graphdef, cfg, **static) -> (state, aux)`, jitted with the state
        donated and kept in its sharding; shared by every trainer of the same setup (no recompiles)."""
        step_cfg = self.cfg.replace(seed=0, data=DataConfig())  # the step reads neither: no recompiles for them
        static = dict(graphdef=self.graphdef, cfg=step_cfg, **static)
        shardings = None if self.state_shardings is None else jax.tree.flatten(self.state_shardings)
        return _jit_donating(fn, shardings and (tuple(shardings[0]), shardings[1]), tuple(sorted(static.items())))

    # ------------------------------------------------------------------ training

    def device_batch(self, batch: Batch) -> dict[str, Array]:
        """This host's numpy batch as global arrays (sharded over data x fsdp on a mesh)."""
        if self.mesh is None:
            return {k: jnp.asarray(v) for k, v in batch.items()}

        return {k: jax.make_array_from_process_local_data(self.batch_sharding(v.shape), v) for k, v in batch.items()}

    def batch_sharding(self, shape: tuple[int, ...]) -> NamedSharding:
        """How a batch array of `shape` lies on the mesh: `batch_axes` by the sharding rules."""
        axes = self.batch_axes + (None,) * (len(shape) - len(self.batch_axes))
        return NamedSharding(self.mesh, logical_to_spec(axes, shape, self.mesh, self.rules))

    def step(self, batch: Batch) -> dict[str, np.ndarray]:
        """One optimizer step; returns the metrics (loss, tokens, grad_norm, learning_rate)."""
        self.state, metrics = self._step(self.state, self.frozen, self.device_batch(batch), self.teacher,
                                         self.horizon)
        return jax.device_get(metrics)

    def fit(self, dataset: grain.MapDataset, *, checkpointer=None, save_every: int = 0,
            max_steps: int | None = None, progress: str | None = None) -> list[dict[str, np.ndarray]]:
        """Train through `dataset` (from `distill_dataset`), resuming from `checkpointer`'s latest save.

        Saves every `save_every` steps and at the end (or after `max_steps` steps of this call).
        `progress`: the label of a tqdm bar (with the running loss); None shows none.
        """
        iterator = iter(dataset)
        if checkpointer is not None and checkpointer.latest_step() is not None:
            self.state = checkpointer.restore(self.state, iterator)
            log.info("resumed at step %d", self.steps_done)
        history = []
        total = min(len(dataset), max_steps) if max_steps is not None else len(dataset)
        bar = tqdm.tqdm(total=max(total - self.steps_done, 0), desc=progress, disable=progress is None,
                        leave=False, dynamic_ncols=True)
        for batch in itertools.islice(iterator, max_steps):  # islice never reads past the limit
            history.append(self.step(batch))
            bar.set_postfix(loss="/".join(f"{x:.3f}" for x in np.ravel(history[-1]["loss"])), refresh=False)
            bar.update()
            if checkpointer is not None and save_every and self.steps_done % save_every == 0:
                checkpointer.save(self.steps_done, self.state, iterator)
        bar.close()
        if checkpointer is not None:
            if history and checkpointer.latest_step() != self.steps_done:
                checkpointer.save(self.steps_done, self.state, iterator)
            checkpointer.wait()
        return history

    # ------------------------------------------------------------------ results

    @property
    def steps_done(self) -> int:
        return int(np.asarray(jax.device_get(self.state.step)).reshape(-1)[0])

    def _merged_params(self) -> Params:
        return full_params(self.state.params, self.frozen, self.cfg)

    def params(self) -> Params:
        """The parameters after training (LoRA merged), in the dtype the student came in."""
        return jax.tree.map(lambda x: x.astype(self.export_dtype), self._merged_params())

    def export(self) -> Transformer:
        """The trained student as a plain `Transformer` (LoRA merged into the base weights)."""
        return nnx.merge(self.export_graphdef, self.params())
