"""`Pool`: the N models a strategy collaborates with, and the three things strategies ask of them.

    pool = Pool([Member("a", model_a, tok_a), Member("b", model_b, tok_b)], generation=0)
    outs = pool.generate([(0, messages), (1, messages)], params)   # one engine call per round
    outs[0][0].text, outs[0][0].tokens, outs[0][0].logprobs        # n completions per request
    fused = pool.fused_generate([messages], params)                 # logit fusion (shared vocabulary)
    pool.score(1, messages, "The answer is 7.")                     # log-likelihood of a completion
    pool.weights_digest()                                           # what the members' weights are now

Every strategy round sends all its requests (items x agents) in ONE `generate` call, which makes one
engine call: the `PoolEngine` of all members (members of one architecture stacked into one vmapped
program, docs/method.md §3), or a member's own engine when the round asks a single member. Seeds come
from the `rng` of `Strategy.run` (`sampling_params`), so a strategy is deterministic given its rng.

The bottom of the module holds what the text strategies share: sampling settings, `ask` (one round
-> Turns), answer extraction and voting, and `choose` (a judge's verdict among options).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from agora_jax import sampling
from agora_jax.models import Tokenizer, Transformer
from agora_jax.sampling import Completion, SamplingParams
from agora_jax.strategies import prompts
from agora_jax.strategies.base import Turn, majority_vote
from agora_jax.tasks import Example, extract_answer, normalize_math
from agora_jax.tasks.grade import normalize_text
from agora_jax.tasks.numeric import format_number, parse_number

Message = dict[str, str]
Request = tuple[int, list[Message]]

# backend(pool, member_indices, prompts, params) -> completions per prompt; the default runs the
# sampling engines, tests pass a scripted one.
Backend = Callable[["Pool", list[int], list[list[Message]], SamplingParams], list[list[Completion]]]


@dataclasses.dataclass
class Member:
    """One pool model: a name (used in transcripts and `DistillExample.targets`), weights, tokenizer."""

    name: str
    model: Transformer
    tokenizer: Tokenizer


def seed_ints(rng: jax.Array, n: int) -> list[int]:
    """`n` host integers drawn from a JAX key: the per-call seeds of a strategy run."""
    return [int(s) for s in np.asarray(jax.random.randint(rng, (n,), 0, 2**31 - 1))]


class Pool:
    """N members at one evolution `generation`; engines are built lazily and reused across calls.

    `base`: the checkpoint every member was trained from, when they share one (anything
    `agora_jax.models.load` reads): the origin of their task vectors for weight merging."""

    def __init__(self, members: Sequence[Member], generation: int = 0, *, backend: Backend | None = None,
                 engine_options: dict[str, Any] | None = None, base: str | None = None):
        if not members:
            raise ValueError("a pool needs at least one member")
        names = [m.name for m in members]
        if len(set(names)) != len(names):
            raise ValueError(f"pool member names must be unique, got {names}")
        self.members = list(members)
        self.generation = generation
        self.base = base
        self._backend = backend or _engine_backend
        self._engine_options = dict(engine_options or {})  # Engine/PoolEngine keywords: mesh, max_batch, ...
        self._engines: dict[int | None, Any] = {}

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]

    def __len__(self) -> int:
        return len(self.members)

    def __getitem__(self, index: int) -> Member:
        return self.members[index]

    def index(self, name: str) -> int:
        return self.names.index(name)

    # ------------------------------------------------------------------ generation

    def generate(self, requests: Sequence[Request], params: SamplingParams) -> list[list[Completion]]:
        """`params.n` completions for every (member index, chat messages) request, in order.

        Seeds follow the engines: the call's requests, grouped by member in member order, take
        consecutive seeds from `params.seed`, so no two requests of a call share one (members with
        identical weights sample differently)."""
        for member, _ in requests:
            if not 0 <= member < len(self):
                raise IndexError(f"request for member {member}; the pool has {len(self)}")
        if not requests:
            return []
        return self._backend(self, [m for m, _ in requests], [list(msgs) for _, msgs in requests], params)

    def fused_generate(self, messages_list: Sequence[list[Message]], params: SamplingParams,
                       weights: Sequence[float] | None = None, mode: str = "logits") -> list[list[Completion]]:
        """`params.n` completions per prompt decoded from the weighted average (default uniform) of all
        members' next-token logits (`mode="probs"`: probabilities); members must share a vocabulary."""
        return self.engine().fused_generate([list(m) for m in messages_list], params, weights=weights, mode=mode)

    def engine(self, member: int | None = None) -> Any:
        """The sampling engine of one member, or (None) the `PoolEngine` of all members, built once:
        members of one architecture are stacked into one vmapped program."""
        if member not in self._engines:
            if member is None:
                self._engines[None] = sampling.PoolEngine([m.model for m in self.members],
                                                          [m.tokenizer for m in self.members], **self._engine_options)
            else:
                self._engines[member] = sampling.Engine(self[member].model, self[member].tokenizer,
                                                        **self._engine_options)
        return self._engines[member]

    def refresh(self) -> None:
        """Forget the engines (they snapshot weights): call after updating members' weights in place."""
        self._engines.clear()

    def weights_digest(self) -> str:
        """A digest of every member's name and current parameters, computed afresh on each call (one
        jitted read of the weights, on device), so it can never describe weights that have since
        changed: what a strategy's cached fit is keyed by (`strategies.base.fingerprint`)."""
        return _sha256([[m.name, params_digest(nnx.state(m.model, nnx.Param))] for m in self.members])

    # ------------------------------------------------------------------ scoring

    def score(self, member: int, messages: list[Message], completion: str, reduce: str = "sum",
              whole_turn: bool = True) -> float:
        """Log-likelihood of `completion` as the assistant reply to `messages` under one member.

        whole_turn: the tokens of `tokenizer.format_completion(completion)` (the reply, end of turn
        included: exactly what distillation trains on); False: the reply starts with `completion`.
        `reduce`: "sum" or "mean" over the scored tokens."""
        return self.score_batch([(member, messages, completion)], reduce, whole_turn)[0]

    def score_batch(self, requests: Sequence[tuple[int, list[Message], str]], reduce: str = "sum",
                    whole_turn: bool = True) -> list[float]:
        """`score` for many (member, messages, completion) triples: one batched forward per member."""
        if reduce not in ("sum", "mean"):
            raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
        out = [0.0] * len(requests)
        by_member: dict[int, list[int]] = {}
        for k, (member, _, _) in enumerate(requests):
            by_member.setdefault(member, []).append(k)
        for member, rows in by_member.items():
            tok = self.members[member].tokenizer
            pairs = [(tok.encode_chat(messages), tok.encode(tok.format_completion(text) if whole_turn else text))
                     for _, messages, text in (requests[k] for k in rows)]
            for k, lp in zip(rows, completion_logprobs(self.members[member].model, pairs)):
                out[k] = float(lp.sum()) if reduce == "sum" else float(lp.mean()) if lp.size else 0.0
        return out


def _engine_backend(pool: Pool, members: list[int], prompts: list[list[Message]],
                    params: SamplingParams) -> list[list[Completion]]:
    """One engine call for the whole round: the `PoolEngine` (each member its own prompts, stacked
    groups vmapped), or the member's own engine when a single member has all the requests."""
    per_member: dict[int, list[list[Message]]] = {}
    where = []
    for m, prompt in zip(members, prompts):
        where.append((m, len(per_member.setdefault(m, []))))
        per_member[m].append(prompt)
    if len(per_member) == 1:
        (m, member_prompts), = per_member.items()
        outs = {m: pool.engine(m).generate(member_prompts, params)}
    else:
        outs = dict(enumerate(pool.engine().generate([per_member.get(m, []) for m in range(len(pool))], params)))
    return [list(outs[m][i]) for m, i in where]


# ---------------------------------------------------------------------- weights digest

# Odd multipliers (Knuth's 2654435761 and the murmur3 finaliser constant) of the two position weights.
_MULTIPLIERS = (2654435761, 0x85EBCA6B)


def _leaf_sums(x: jax.Array) -> jax.Array:
    """Two uint32 checksums of one tensor's bits: sum_i bits_i * (c * i | 1) mod 2**32 for both
    multipliers c, where i is the flat position. Each weight is odd, hence invertible mod 2**32, so
    changing any single element changes both sums; uint32 addition is associative, so the sums do not
    depend on sharding or reduction order, and positions come from iotas (no reshape of a sharded
    array)."""
    width = jnp.dtype(x.dtype).itemsize * 8
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    elif width > 32:  # split each element into 32-bit words (a new minor axis)
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    else:
        bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{width}")).astype(jnp.uint32)
    position, stride = jnp.zeros(bits.shape, jnp.uint32), 1
    for axis in reversed(range(bits.ndim)):
        position += jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= bits.shape[axis]
    return jnp.stack([jnp.sum(bits * (position * jnp.uint32(c) | jnp.uint32(1)), dtype=jnp.uint32)
                      for c in _MULTIPLIERS])


_tree_sums = jax.jit(lambda leaves: jnp.stack([_leaf_sums(x) for x in leaves]))


def params_digest(tree: Any) -> str:
    """A hex digest of a parameter pytree: its structure, every leaf's path, shape and dtype, and the
    leaf checksums (`_leaf_sums`), combined on the host."""
    paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(tree)[0])
    sums = np.asarray(_tree_sums(list(leaves))).tolist()
    return _sha256([[jax.tree_util.keystr(p), list(x.shape), str(x.dtype), s] for p, x, s in zip(paths, leaves, sums)])


def _sha256(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj).encode()).hexdigest()


# ---------------------------------------------------------------------- log-likelihood


def _bucket(n: int, minimum: int = 16) -> int:
    """Next power of two >= n (bounded below): few distinct shapes, few compiles."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


@functools.partial(jax.jit, static_argnums=0)
def _read_logprobs(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array, mask: jax.Array,
                   positions: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(targets[b, c] | ids[b, :positions[b, c] + 1]), `[B, C]`: logits only where read."""
    model = nnx.merge(graphdef, state)
    hidden = model.hidden_states(ids, mask)
    picked = jnp.take_along_axis(hidden, positions[..., None], axis=1)  # [B, C, D]
    logp = jax.nn.log_softmax(model.logits(picked).astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def completion_logprobs(model: Transformer, pairs: Sequence[tuple[list[int], list[int]]],
                        max_batch_tokens: int = 8192, max_logits: int = 2**24) -> list[np.ndarray]:
    """Per-token log-probabilities of each completion given its prompt (token ids).

    A completion's last token is never an input, so each pair runs as the sequence prompt +
    completion[:-1] and pairs sharing that sequence share one row (options of one token after one
    prompt: one forward). Rows are right-padded and bucketed to powers of two; a batch holds at most
    `max_batch_tokens` tokens and `max_logits` logits."""
    rows: dict[tuple[int, ...], list[tuple[int, int, int]]] = {}  # sequence -> (pair, position, target)
    for k, (prompt, completion) in enumerate(pairs):
        if not prompt:
            raise ValueError("scoring needs a non-empty prompt")
        reads = rows.setdefault(tuple(prompt) + tuple(completion[:-1]), [])
        reads += [(k, len(prompt) - 1 + t, target) for t, target in enumerate(completion)]
    out = [np.zeros(len(c), np.float32) for _, c in pairs]
    graphdef, state = nnx.split(model)
    shapes: dict[tuple[int, int], list[tuple[int, ...]]] = {}  # (length, reads) buckets -> rows
    for seq, reads in rows.items():
        shapes.setdefault((_bucket(len(seq)), _bucket(len(reads), 1)), []).append(seq)
    for (length, width), seqs in shapes.items():
        size = max(1, min(max_batch_tokens // length, max_logits // (width * model.config.vocab_size)))
        for lo in range(0, len(seqs), size):
            chunk = seqs[lo:lo + size]
            batch = _bucket(len(chunk), 1)
            ids, mask = np.zeros((batch, length), np.int32), np.zeros((batch, length), bool)
            positions, targets = np.zeros((batch, width), np.int32), np.zeros((batch, width), np.int32)
            for r, seq in enumerate(chunk):
                ids[r, :len(seq)], mask[r, :len(seq)] = seq, True
                positions[r, :len(rows[seq])] = [p for _, p, _ in rows[seq]]
                targets[r, :len(rows[seq])] = [t for _, _, t in rows[seq]]
            logp = np.asarray(_read_logprobs(graphdef, state, *map(jnp.asarray, (ids, mask, positions, targets))))
            for r, seq in enumerate(chunk):
                for c, (k, p, _) in enumerate(rows[seq]):
                    out[k][p - len(pairs[k][0]) + 1] = logp[r, c]
    return out


# ---------------------------------------------------------------------- helpers shared by strategies


def sampling_defaults() -> ml_collections.ConfigDict:
    """`config.sampling` of every text strategy: the reference code's T=0.7, top_p=0.9, 512 tokens."""
    return ml_collections.ConfigDict(dict(temperature=0.7, top_p=0.9, top_k=0, min_p=0.0, max_new_tokens=512))


def sampling_params(cfg: ml_collections.ConfigDict, rng: jax.Array, round: int, **overrides: Any) -> SamplingParams:
    """SamplingParams from `cfg` (a `sampling_defaults()` dict) with a seed drawn from `rng` folded
    with `round`, so every round of a run samples with its own reproducible seed."""
    seed = seed_ints(jax.random.fold_in(rng, round), 1)[0]
    return SamplingParams(**{**cfg.to_dict(), "seed": seed, **overrides})


def ask(pool: Pool, requests: Sequence[tuple[str, int, list[Message]]], params: SamplingParams, *,
        round: int, role: str, transcript: list[Turn]) -> list[list[Completion]]:
    """One strategy round: every (item id, member, messages) request in one `pool.generate` call,
    one `Turn` per generated message appended to `transcript`."""
    outs = pool.generate([(member, messages) for _, member, messages in requests], params)
    for (item_id, member, messages), completions in zip(requests, outs):
        prompt_tokens = len(pool[member].tokenizer.encode_chat(messages))
        for c in completions:
            transcript.append(Turn(item_id=item_id, model=pool.names[member], round=round, role=role,
                                   prompt=list(messages), output=c.text, prompt_tokens=prompt_tokens,
                                   output_tokens=len(c.tokens),
                                   logprobs=None if c.logprobs is None else [float(x) for x in c.logprobs]))
    return outs


def answer_items(pool: Pool, members: Sequence[int], items: Sequence[Example], params: SamplingParams, *,
                 round: int, transcript: list[Turn], role: str = "answer") -> list[Turn]:
    """Item k answered by member `members[k]` (one `generate` call, `params.n` must be 1); returns the
    new turns, also appended to `transcript`."""
    start = len(transcript)
    ask(pool, [(it.id, int(m), it.messages) for it, m in zip(items, members)], params, round=round, role=role,
        transcript=transcript)
    return transcript[start:]


def answer_key(answer: str, answer_type: str) -> str:
    """What two extracted answers must share to count as the same vote ("2.0" == "2", case, spacing)."""
    if answer_type == "math":
        return normalize_math(answer)
    value = parse_number(answer) if answer_type == "number" else None
    return format_number(value) if value is not None else normalize_text(answer)


def extract(text: str, example: Example) -> str | None:
    """The final answer `text` states for `example`, normalised for voting (None: none found)."""
    answer = extract_answer(text, example.answer_type, example.choices)
    return None if answer is None else answer_key(answer, example.answer_type)


def vote(texts: Sequence[str], example: Example) -> tuple[int | None, str | None]:
    """Majority over the answers extracted from `texts` (`majority_vote`: ties go to the earliest).
    Returns (index of the first text holding the winning answer, that answer)."""
    return majority_vote([extract(t, example) for t in texts])


JUDGE_MODES = ("likelihood", "generate")  # `choose`'s modes: a strategy's `judge` setting


def choose(pool: Pool, requests: Sequence[tuple[str, int, list[Message]]], options: Sequence[str], *, mode: str,
           params: SamplingParams, round: int, role: str, transcript: list[Turn]) -> list[np.ndarray]:
    """A judgment among `options` (e.g. "A"/"B", "Yes"/"No") per (item id, member, messages) request,
    as probabilities over the options.

    mode "likelihood": the member's likelihood of starting its reply with each option, normalised
    over the options (one batched forward; the Turn's logprobs are the options' log-likelihoods);
    mode "generate": `params.n` sampled replies, each read by its first word (a reply naming no
    option counts as uniform)."""
    if mode == "likelihood":
        flat = pool.score_batch([(m, msgs, o) for _, m, msgs in requests for o in options], whole_turn=False)
        out = []
        for k, (item_id, member, messages) in enumerate(requests):
            ll = np.asarray(flat[k * len(options):(k + 1) * len(options)])
            out.append(np.exp(ll - np.logaddexp.reduce(ll)))
            transcript.append(Turn(item_id=item_id, model=pool.names[member], round=round, role=role,
                                   prompt=list(messages), output=options[int(np.argmax(ll))],
                                   prompt_tokens=len(pool[member].tokenizer.encode_chat(messages)),
                                   logprobs=[float(x) for x in ll]))
        return out
    if mode != "generate":
        raise ValueError(f"judgment mode must be 'likelihood' or 'generate', got {mode!r}")
    out = []
    for completions in ask(pool, requests, params, round=round, role=role, transcript=transcript):
        probs = np.zeros(len(options))
        for c in completions:
            pick = prompts.first_option(c.text, options)
            probs += np.full(len(options), 1 / len(options)) if pick is None else np.eye(len(options))[pick]
        out.append(probs / len(completions))
    return out


def voted_text(texts: Sequence[str], example: Example) -> str:
    """The first of `texts` holding the majority answer (the first text when none has an answer)."""
    index, _ = vote(texts, example)
    return texts[index or 0]
