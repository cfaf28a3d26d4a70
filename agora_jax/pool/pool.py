"""`Pool`: the N models a strategy collaborates with, and the one place their weights change.

    pool = Pool([Member("a", model_a, tok_a), Member("b", model_b, tok_b)], generation=0)
    outs = pool.generate([(0, messages), (1, messages)], params)   # one engine call per round
    outs[0][0].text, outs[0][0].tokens, outs[0][0].logprobs        # n completions per request
    fused = pool.fused_generate([messages], params)                 # logit fusion (shared vocabulary)
    pool.score(1, messages, "The answer is 7.")                     # log-likelihood of a completion
    pool.update("b", params)                                        # new weights, engines kept
    pool.each_model(items, call)                                    # once per distinct model
    pool.weights_digest()                                           # what the members' weights are now

Every strategy round sends all its requests (items x agents) in ONE `generate` call, which makes one
engine call: the `PoolEngine` of all members (members of one architecture stacked into one vmapped
program, docs/method.md §3), or a member's own engine when the round asks a single member.
`update(name, params)` is how a member's weights change (distillation, resume): the member's model
takes them, and the engines re-read the weights when the pool next hands one out (`engine()`, which
every generation goes through), keeping their compiled programs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence, TypeVar

from flax import nnx

from agora_jax import sampling
from agora_jax.models import Tokenizer, Transformer
from agora_jax.pool.digest import params_digest, sha256
from agora_jax.pool.scoring import completion_logprobs
from agora_jax.sampling import Completion, SamplingParams

Message = dict[str, str]
Request = tuple[int, list[Message]]
Params = dict  # a member's parameters as a pure dict (`params_of`)
T = TypeVar("T")
R = TypeVar("R")

# backend(pool, member_indices, prompts, params) -> completions per prompt; the default runs the
# sampling engines, tests pass a scripted one.
Backend = Callable[["Pool", list[int], list[list[Message]], SamplingParams], list[list[Completion]]]


@dataclasses.dataclass
class Member:
    """One pool model: a name (used in transcripts and `DistillExample.targets`), weights, tokenizer."""

    name: str
    model: Transformer
    tokenizer: Tokenizer


def params_of(model: nnx.Module) -> Params:
    """A model's parameters as a pure dict (what checkpoints store)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def load_params_into(model: nnx.Module, params: Params) -> None:
    """Set `model`'s parameters to `params` in place (a model not in a pool: a pool's members change
    through `Pool.update`)."""
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)


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
        self._stale = False  # members' weights changed since the engines read them

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]

    def __len__(self) -> int:
        return len(self.members)

    def __getitem__(self, index: int) -> Member:
        return self.members[index]

    @property
    def mesh(self) -> Any:
        """The device mesh the engines sample on (`engine_options["mesh"]`; None: one device), which
        distillation trains the members on too."""
        return self._engine_options.get("mesh")

    def index(self, name: str) -> int:
        return self.names.index(name)

    def of(self, members: Sequence[Member]) -> Pool:
        """A pool of other `members` at this pool's generation whose engines sample as this pool's do
        (the same mesh and batch shapes): e.g. the model a weight merge builds."""
        return Pool(members, self.generation, engine_options=self._engine_options)

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
        if self._stale:  # re-read once after any number of updates, compiled programs kept
            for engine in self._engines.values():
                engine.refresh()
            self._stale = False
        if member not in self._engines:
            if member is None:
                self._engines[None] = sampling.PoolEngine([m.model for m in self.members],
                                                          [m.tokenizer for m in self.members], **self._engine_options)
            else:
                self._engines[member] = sampling.Engine(self[member].model, self[member].tokenizer,
                                                        **self._engine_options)
        return self._engines[member]

    # ------------------------------------------------------------------ weights

    def params(self, name: str) -> Params:
        """Member `name`'s current parameters (a pure dict)."""
        return params_of(self[self.index(name)].model)

    def update(self, name: str, params: Params) -> None:
        """Member `name` takes `params`. The engines re-read the weights before their next call (once,
        however many members changed), keeping their compiled programs."""
        load_params_into(self[self.index(name)].model, params)
        self._stale = True

    def first_copies(self) -> list[int]:
        """For each member, the first member with the same weights (itself when none before it has
        them): a pretrained pool of copies answers a greedy evaluation once per distinct model."""
        digests = [params_digest(nnx.state(m.model, nnx.Param)) for m in self.members]
        return [digests.index(d) for d in digests]

    def each_model(self, items: Sequence[T], call: Callable[[list[tuple[int, T]]], Sequence[R]],
                   distinct: bool = True) -> list[list[R]]:
        """`call` once on the (member index, item) pairs of every member (`distinct`: of every distinct
        model, `first_copies`) and item, member-major; returns each member's outputs on `items`, a copy
        getting its first copy's. How a greedy evaluation asks a pool of copies once per distinct model."""
        source = self.first_copies() if distinct else list(range(len(self)))
        asked = sorted(set(source))
        outs = list(call([(m, item) for m in asked for item in items]))
        n = len(items)
        per_model = {m: outs[k * n:(k + 1) * n] for k, m in enumerate(asked)}
        return [per_model[source[i]] for i in range(len(self))]

    def weights_digest(self) -> str:
        """A digest of every member's name and current parameters, computed afresh on each call (one
        jitted read of the weights, on device), so it can never describe weights that have since
        changed: what a strategy's cached fit is keyed by (`strategies.base.fingerprint`)."""
        return sha256([[m.name, params_digest(nnx.state(m.model, nnx.Param))] for m in self.members])

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


