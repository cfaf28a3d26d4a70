"""The pure, jit-compiled half of sampling: prefill, the decode loop, token selection.

A `Decoder` says how a group of models turns tokens into next-token logits with a KV cache: one
model, N stacked models (a leading model axis on params, caches and rows, `jax.vmap`), or N fused
models (one row per prompt, every member's logits averaged). `prefill` runs the prompts and picks
the first token; `decode` is one `lax.while_loop` that feeds the latest token and picks the next,
until `max_new` tokens or every row has emitted a stop token. Sampling settings are runtime arrays
(`Knobs`), so changing them never recompiles; only greedy-vs-sampling is static.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from agora_jax.models import KVCache, Transformer

Array = jax.Array
# (params, tokens [*rows, T], positions [*rows, T], cache, mask [*rows, T], window) -> (logits [*rows, V]
# of the last position, cache); `window` (static) is how many leading cache slots the tokens may read
Forward = Callable[[Any, Array, Array, Any, Array, int], tuple[Array, Any]]
FusionMode = Literal["logits", "probs"]
PAD = 0  # written after a row stopped; masked out on the host by the row's length


@dataclasses.dataclass(frozen=True)
class Decoder:
    """A group of models as one next-token function; `lead` are the row axes before the batch axis.

    Decoders compare by `key` (kind and model graph definitions), so models of one architecture share
    compiled programs: a new engine for updated weights does not recompile.
    """

    forward: Forward = dataclasses.field(compare=False)
    init_cache: Callable[[Any, int, int], Any] = dataclasses.field(compare=False)  # (params, batch, max_len) -> cache
    lead: tuple[int, ...]
    key: tuple


def single_decoder(model: Transformer | nnx.GraphDef) -> Decoder:
    """One model (or its graph definition: params may then be a pure dict, as the trainer holds them)."""
    # structure only: compiled programs must not keep weights alive
    graphdef = model if isinstance(model, nnx.GraphDef) else nnx.graphdef(model)

    def forward(params, tokens, positions, cache, mask, window):
        logits, cache = nnx.merge(graphdef, params).forward(tokens, positions, cache, mask, window)
        return logits[..., -1, :], cache

    def init_cache(params, batch: int, max_len: int) -> KVCache:
        return nnx.merge(graphdef, params).init_cache(batch, max_len)

    return Decoder(forward, init_cache, (), ("single", graphdef))


def model_axis(variable: nnx.Variable) -> int:
    """Where a stacked pool puts its model axis in a parameter: after the layer axis of layer-stacked
    parameters (the layer scan then slices one contiguous block per layer), else first."""
    axes = variable.get_metadata().get("out_sharding") or ()
    return 1 if tuple(axes[:1]) == ("layers",) else 0


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _param_axes(params: Any) -> Any:
    return jax.tree.map(model_axis, params, is_leaf=_is_variable)


# Caches of a stacked group: every field gets a leading model axis (`[models, layers, batch, ...]` for
# keys and values), one shared write index. Model axis first, where vmap keeps its batch dimension: with
# it anywhere else, the batched cache update transposed and copied the whole cache at every step.
_CACHE_AXES = KVCache(0, 0, 0, None)


def stacked_decoder(model: Transformer | nnx.GraphDef, size: int, shared_rows: bool = False,
                    leading: bool = False) -> Decoder:
    """`size` models of `model`'s architecture, params stacked along `model_axis`, run by one vmap;
    `leading`: params stacked on a leading axis instead (the trainer's pure-dict layout, `distill.stacked`).

    Each model has its own rows unless `shared_rows` (logit fusion: every member reads the same tokens).
    """
    single = single_decoder(model)
    rows = None if shared_rows else 0

    def forward(params, tokens, positions, cache, mask, window):
        one = lambda p, t, pos, c, m: single.forward(p, t, pos, c, m, window)  # noqa: E731
        return jax.vmap(one, in_axes=(0 if leading else _param_axes(params), rows, rows, _CACHE_AXES, rows),
                        out_axes=(0, _CACHE_AXES))(params, tokens, positions, cache, mask)

    def init_cache(params, batch: int, max_len: int) -> KVCache:
        first = (jax.tree.map(lambda x: x[0], params) if leading else
                 jax.tree.map(lambda v: v.replace(jnp.take(v[...], 0, axis=model_axis(v))), params,
                              is_leaf=_is_variable))
        cache = single.init_cache(first, batch, max_len)
        stack = lambda x: jnp.broadcast_to(x, (size, *x.shape))  # noqa: E731
        return KVCache(stack(cache.k), stack(cache.v), stack(cache.valid), cache.index)

    return Decoder(forward, init_cache, () if shared_rows else (size,),
                   ("stacked", single.key, size, shared_rows, leading))


def fused_decoder(groups: Sequence[tuple[Transformer | nnx.GraphDef, int]], mode: FusionMode,
                  leading: bool = False) -> Decoder:
    """Logit fusion over stacked groups `(architecture, size)` sharing one vocabulary: params are
    `{"members": (stacked params per group), "weights": [M] or, a mix per row, [M, B]}`, one cache per
    group, one row per prompt. `leading`: as for `stacked_decoder`."""
    members = [stacked_decoder(model, size, shared_rows=True, leading=leading) for model, size in groups]

    def forward(params, tokens, positions, caches, mask, window):
        outs = [m.forward(p, tokens, positions, c, mask, window)
                for m, p, c in zip(members, params["members"], caches)]
        logits = jnp.concatenate([logits for logits, _ in outs]).astype(jnp.float32)  # [M, B, V]
        return fuse(logits, params["weights"], mode), tuple(cache for _, cache in outs)

    def init_cache(params, batch: int, max_len: int) -> tuple:
        return tuple(m.init_cache(p, batch, max_len) for m, p in zip(members, params["members"]))

    return Decoder(forward, init_cache, (), ("fused", tuple(m.key for m in members), mode))


def fuse(logits: Array, weights: Array, mode: FusionMode) -> Array:
    """Weighted average over the leading member axis of logits `[M, *rows, V]`, or of probabilities
    (returned as log-probs); `weights` `[M]`, or `[M, *rows]` for a mix of its own per row."""
    w = weights.reshape(weights.shape + (1,) * (logits.ndim - weights.ndim))
    if mode == "logits":
        return jnp.sum(w * logits, axis=0)
    return jax.nn.logsumexp(jax.nn.log_softmax(logits, axis=-1) + jnp.log(w), axis=0)


# ---------------------------------------------------------------------- token selection


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Knobs:
    """Runtime sampling settings of one call."""

    temperature: Array  # f32 []
    top_k: Array  # i32 [], 0 = off
    top_p: Array  # f32 [], 1 = off
    min_p: Array  # f32 [], 0 = off
    is_stop: Array  # bool [*lead, V]
    max_new: Array  # i32 []


NUCLEUS_CANDIDATES = 1024  # tokens ranked for top-k / top-p filtering


def filter_logits(logits: Array, top_k: Array, top_p: Array, min_p: Array) -> Array:
    """Set to -inf every logit outside the top-k, then outside the top-p nucleus (of the top-k
    distribution), then below min_p times the top probability. `logits` is `[R, V]`."""
    vocab = logits.shape[-1]

    def nucleus(logits: Array) -> Array:  # needs ranking: only run when top-k or top-p is on
        # Rank only the best NUCLEUS_CANDIDATES tokens (`lax.top_k`; a full sort of a 49k vocabulary
        # cost ~25x more per CPU decode step). Exact unless a nucleus needs more candidates than that.
        k = min(vocab, NUCLEUS_CANDIDATES)
        ranked = jax.lax.top_k(logits, k)[0]  # descending
        in_top_k = jnp.arange(k) < jnp.where(top_k > 0, top_k, k)
        # probabilities of the top-k distribution (of the whole vocabulary when top-k is off or wider)
        restricted = (top_k > 0) & (top_k <= k)
        log_total = jnp.where(restricted, jax.nn.logsumexp(jnp.where(in_top_k, ranked, -jnp.inf), axis=-1, keepdims=True),
                              jax.nn.logsumexp(logits, axis=-1, keepdims=True))
        probs = jnp.where(in_top_k, jnp.exp(ranked - log_total), 0.0)
        keep = in_top_k & (jnp.cumsum(probs, axis=-1) - probs < top_p)  # mass before the token < top_p
        cut = jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1, keepdims=True)
        return jnp.where(logits >= cut, logits, -jnp.inf)

    logits = jax.lax.cond((top_k > 0) | (top_p < 1), nucleus, lambda x: x, logits)
    floor = jnp.max(logits, axis=-1, keepdims=True) + jnp.log(min_p)  # log(0) = -inf keeps all
    return jnp.where(logits >= floor, logits, -jnp.inf)


def first_argmax(x: Array) -> Array:
    """`jnp.argmax` over the last axis (the first maximal index) as two plain reductions, which
    XLA:CPU runs about 2x faster than argmax's variadic (value, index) reduction."""
    top = jnp.max(x, axis=-1, keepdims=True)
    return jnp.min(jnp.where(x == top, jnp.arange(x.shape[-1]), x.shape[-1]), axis=-1)


def select_tokens(logits: Array, keys: Array, knobs: Knobs, greedy: bool) -> tuple[Array, Array]:
    """Next tokens `[*rows]` and their log-probabilities under the unfiltered `logits` `[*rows, V]`."""
    rows = logits.shape[:-1]
    logits = logits.reshape(-1, logits.shape[-1]).astype(jnp.float32)
    if greedy:
        tokens = first_argmax(logits)
    else:
        filtered = filter_logits(logits / knobs.temperature, knobs.top_k, knobs.top_p, knobs.min_p)
        tokens = jax.vmap(jax.random.categorical)(keys.reshape(-1), filtered)
    chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
    logprobs = chosen - jax.nn.logsumexp(logits, axis=-1)
    return tokens.astype(jnp.int32).reshape(rows), logprobs.reshape(rows)


# ---------------------------------------------------------------------- prefill and decode


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """The decode loop's carry; `rows` is `(*lead, batch)`."""

    cache: Any
    tokens: Array  # i32 [*rows, N]: generated ids, PAD after a row stopped
    logprobs: Array  # f32 [*rows, N]
    last: Array  # i32 [*rows]: the latest token, fed next
    positions: Array  # i32 [*rows]: the latest token's position
    done: Array  # bool [*rows]: emitted a stop token (or is a padding row)
    lengths: Array  # i32 [*rows]: tokens generated up to and including the stop token
    keys: Array  # PRNG keys [*rows]
    step: Array  # i32 []: tokens generated so far


def _advance(state: DecodeState, logits: Array, knobs: Knobs, greedy: bool) -> DecodeState:
    """Pick the next token of every row from `logits` and record it."""
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(state.keys.reshape(-1), state.step)
    tokens, logprobs = select_tokens(logits, step_keys.reshape(state.keys.shape), knobs, greedy)
    live = ~state.done

    def write(buffer: Array, column: Array) -> Array:
        return jax.lax.dynamic_update_slice_in_dim(buffer, column[..., None], state.step, axis=-1)

    return dataclasses.replace(
        state,
        tokens=write(state.tokens, jnp.where(live, tokens, PAD)),
        logprobs=write(state.logprobs, jnp.where(live, logprobs, 0.0)),
        last=tokens,
        done=state.done | jnp.take_along_axis(knobs.is_stop, tokens, axis=-1),
        lengths=state.lengths + live,
        step=state.step + 1,
    )


def prefill(decoder: Decoder, params: Any, prompt: Array, mask: Array, seeds: Array, samples: Array,
            knobs: Knobs, *, max_new: int, greedy: bool) -> DecodeState:
    """Run left-padded prompts `[*rows, T]` through a fresh cache of `T + max_new` slots and pick the
    first new token (every row's last prompt token sits at T - 1). Row keys come from (seed, sample
    index) only, never from the batch layout."""
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)
    cache = decoder.init_cache(params, prompt.shape[-2], prompt.shape[-1] + max_new)
    # All but the last prompt token first: their logits are unused, so XLA drops that LM-head matmul
    # ([B, T, V], the largest one of the prefill); then the last token, whose logits pick the first token.
    length = prompt.shape[-1]
    _, cache = decoder.forward(params, prompt[..., :-1], positions[..., :-1], cache, mask[..., :-1], 0)
    logits, cache = decoder.forward(params, prompt[..., -1:], positions[..., -1:], cache, mask[..., -1:], length - 1)
    keys = jax.vmap(lambda s, j: jax.random.fold_in(jax.random.key(s), j))(seeds.reshape(-1), samples.reshape(-1))
    rows = seeds.shape
    state = DecodeState(
        cache=cache,
        tokens=jnp.full((*rows, max_new), PAD, jnp.int32),
        logprobs=jnp.zeros((*rows, max_new), jnp.float32),
        last=jnp.zeros(rows, jnp.int32),
        positions=jnp.sum(mask, axis=-1, dtype=jnp.int32),
        done=~jnp.any(mask, axis=-1),
        lengths=jnp.zeros(rows, jnp.int32),
        keys=keys.reshape(rows),
        step=jnp.zeros((), jnp.int32),
    )
    return _advance(state, logits, knobs, greedy)


def decode(decoder: Decoder, params: Any, state: DecodeState, knobs: Knobs, *, prompt_len: int,
           greedy: bool) -> DecodeState:
    """Generate until `knobs.max_new` tokens or until every row is done.

    The loop runs in segments, each a `lax.while_loop` whose attention reads only the first `window`
    cache slots (`decode_windows`): early tokens do not pay for the empty end of the cache.
    """

    def running(s: DecodeState) -> Array:
        return (s.step < knobs.max_new) & ~jnp.all(s.done)

    for window in decode_windows(prompt_len, state.tokens.shape[-1]):
        def step(s: DecodeState, window=window) -> DecodeState:
            feed = s.last[..., None]
            logits, cache = decoder.forward(params, feed, s.positions[..., None], s.cache, jnp.ones(feed.shape, bool),
                                            window)
            return _advance(dataclasses.replace(s, cache=cache, positions=s.positions + 1), logits, knobs, greedy)

        # step k writes the token chosen at step k - 1 into slot prompt_len + k - 1 and reads the slots before it
        state = jax.lax.while_loop(lambda s, window=window: running(s) & (prompt_len + s.step - 1 <= window),
                                   step, state)
    return state


def decode_windows(prompt_len: int, max_new: int, segments: int = 4, minimum: int = 16) -> list[int]:
    """Cache slots read by each decode segment: the prompt plus max_new / 2^k generated tokens, doubling
    up to the whole cache (at most `segments` segments, none shorter than `minimum` tokens)."""
    generated = [max_new >> k for k in range(segments) if max_new >> k >= minimum] or [max_new]
    return [prompt_len + g for g in sorted(generated)]
