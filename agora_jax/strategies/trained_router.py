"""`trained_router` (API level): a router learnt on dev picks, per question, the member that answers.

Fit (dev only, cached per generation, keyed by `fingerprint`):
1. every member answers every dev item (one `pool.generate` call) and each answer is graded;
2. label of an item = the best-scoring member; ties (several correct, or all wrong) go to the member
   whose answer has the highest mean token log-probability under itself (`tie_break="likelihood"`:
   the members' own confidence acts as the judge), or to the lowest index (`tie_break="index"`);
3. `router="lm"` (the paper's router, the default): a copy of the pool LM `router_member` is
   fine-tuned with LoRA (the project's `Trainer`) to answer a routing prompt (the question and the
   member labels, their indices) with the item's label; the member itself is never changed, only the
   adapters are kept. `router="mlp"`: a small classification head (MLP, or linear with `hidden=0`) on
   the frozen mean final hidden state of `router_member` over the question's chat prompt.
Run: the LM router scores every label as its reply to each routing prompt (teacher-forced, one
batched call) and the most likely label answers (ties: lowest index); the MLP routes to its argmax.
On the fit split itself the routed answers are the fit answers (`reuse_fit_answers`), not a second
sample. Final answers are the distillation examples.

Settings (`defaults()`; the shared ones from `router_defaults`): router_member, embed_batch_size,
steps, learning_rate, weight_decay, reuse_fit_answers, sampling (decoding of every answer, fit answers
included); and router, tie_break, hidden (mlp), lm.* (the LM router's LoRA fine-tuning).

`RouterStrategy` holds what every router shares (graded fit answers, cache, routed answers),
`EmbeddingRouter` what the routers on question embeddings share (the MLP here, `graph_router`'s GNN).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import safetensors.numpy
from flax import nnx

from agora_jax.distill import lora as lora_lib
from agora_jax.distill.data import DataConfig, distill_dataset
from agora_jax.distill.trainer import DistillConfig, Trainer
from agora_jax.errors import ConfigError
from agora_jax.models import Tokenizer, Transformer
from agora_jax.sampling.engine import bucket
from agora_jax.records import Result, Role, Turn, pair
from agora_jax.strategies.base import (Strategy, fingerprint, read_transcript, register, single_answer_result,
                                       write_json, write_transcript)
from agora_jax.pool import Pool, completion_logprobs
from agora_jax.strategies.rounds import answer_items, sampling_defaults, sampling_params, seed_ints
from agora_jax.tasks import Example, Task, evaluate

Arrays = dict[str, np.ndarray]
Message = dict[str, str]
TIE_BREAKS = ("likelihood", "index")
ROUTERS = ("lm", "mlp")  # config.strategy.router of trained_router


# ---------------------------------------------------------------------- question embeddings


@functools.partial(jax.jit, static_argnums=0)
def _mean_hidden(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array, mask: jax.Array) -> jax.Array:
    hidden = nnx.merge(graphdef, state).hidden_states(ids, mask).astype(jnp.float32)
    m = mask[..., None].astype(jnp.float32)
    return jnp.sum(hidden * m, 1) / jnp.maximum(jnp.sum(m, 1), 1.0)


def query_embeddings(model: Transformer, tokenizer: Tokenizer, messages: Sequence[list[dict[str, str]]],
                     batch_size: int = 16) -> np.ndarray:
    """Mean over real tokens of the final-norm hidden states of each chat prompt, `[n, D]` float32.

    Left-padded batches of `batch_size` rows, lengths bucketed to powers of two (few compiles)."""
    graphdef, state = nnx.split(model)
    seqs = [tokenizer.encode_chat(m) for m in messages]
    out = np.zeros((len(seqs), model.config.hidden_size), np.float32)
    order = sorted(range(len(seqs)), key=lambda k: len(seqs[k]))
    for lo in range(0, len(order), batch_size):
        rows = order[lo:lo + batch_size]
        length = bucket(max(len(seqs[k]) for k in rows), 16)
        ids = np.full((batch_size, length), tokenizer.pad_id, np.int32)
        mask = np.zeros((batch_size, length), bool)
        for r, k in enumerate(rows):
            ids[r, length - len(seqs[k]):], mask[r, length - len(seqs[k]):] = seqs[k], True
        out[rows] = np.asarray(_mean_hidden(graphdef, state, jnp.asarray(ids), jnp.asarray(mask)))[:len(rows)]
    return out


# ---------------------------------------------------------------------- labels and training


def best_model_labels(scores: np.ndarray, confidence: np.ndarray | None = None) -> np.ndarray:
    """Per row, the column with the highest score; ties go to the highest `confidence`, then to the
    lowest index. `scores`, `confidence`: `[items, members]`."""
    confidence = np.zeros_like(scores) if confidence is None else np.nan_to_num(confidence, nan=-np.inf)
    best = scores == scores.max(axis=1, keepdims=True)
    masked = np.where(best, confidence, -np.inf)
    return np.argmax(best & (masked == masked.max(axis=1, keepdims=True)), axis=1)


LossFn = Callable[[nnx.Module, Any, jax.Array], jax.Array]


@functools.partial(jax.jit, static_argnames=("graphdef", "loss_fn", "learning_rate", "weight_decay"))
def _train_loop(graphdef: nnx.GraphDef, params: nnx.State, data: Any, keys: jax.Array, *, loss_fn: LossFn,
                learning_rate: float, weight_decay: float) -> tuple[nnx.State, jax.Array]:
    tx = optax.adamw(learning_rate, weight_decay=weight_decay)

    def step(carry, key):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p), data, key))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), keys)
    return params, losses


def train(module: nnx.Module, loss_fn: LossFn, data: Any, steps: int, learning_rate: float, weight_decay: float,
          key: jax.Array) -> tuple[nnx.Module, np.ndarray]:
    """Full-batch AdamW on `loss_fn(module, data, key_t)` for `steps` steps: one jitted `lax.scan`
    (compiled once per module structure, loss and data shapes). Returns the trained module and the
    loss of every step."""
    graphdef, params = nnx.split(module)
    params, losses = _train_loop(graphdef, params, data, jax.random.split(key, steps), loss_fn=loss_fn,
                                 learning_rate=float(learning_rate), weight_decay=float(weight_decay))
    return nnx.merge(graphdef, params), np.asarray(losses)


def module_arrays(module: nnx.Module, prefix: str) -> Arrays:
    """The module's state as named numpy arrays (safetensors-ready)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(nnx.state(module))
    return {prefix + jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves}


def module_from_arrays(make: Callable[[], nnx.Module], arrays: Arrays, prefix: str) -> nnx.Module:
    """`make()`'s structure filled with `arrays` saved by `module_arrays(..., prefix)`."""
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    values = [jnp.asarray(arrays[prefix + jax.tree_util.keystr(path)]) for path, _ in leaves]
    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, values))


def standardize(x: np.ndarray, arrays: Arrays) -> np.ndarray:
    return (x - arrays["norm.mean"]) / arrays["norm.std"]


def norm_arrays(x: np.ndarray) -> Arrays:
    """Per-feature mean and std of the dev embeddings (std floored), applied to every query."""
    return {"norm.mean": x.mean(0), "norm.std": np.maximum(x.std(0), 1e-3 * (x.std() + 1e-12))}


# ---------------------------------------------------------------------- the LM router


ROUTE_PROMPT = "Question: {question}\n\nWhich model ({labels}) answers it best? Reply with its number."


def route_messages(question: str, n_members: int) -> list[Message]:
    """The routing prompt: the question and the member labels (their indices, as in the paper)."""
    labels = ", ".join(str(i) for i in range(n_members))
    return [{"role": "user", "content": ROUTE_PROMPT.format(labels=labels, question=question)}]


def lora_config(settings: ml_collections.ConfigDict) -> lora_lib.LoRAConfig:
    """The adapter of the LM router (`settings`: a `defaults().lm` dict)."""
    return lora_lib.LoRAConfig(rank=settings.lora_rank, alpha=settings.lora_alpha, dropout=settings.lora_dropout,
                               targets=tuple(settings.lora_targets))


def fit_lm_router(model: Transformer, tokenizer: Tokenizer, questions: Sequence[str], labels: np.ndarray,
                  n_members: int, settings: ml_collections.ConfigDict,
                  seed: int) -> tuple[lora_lib.Adapters, list[float]]:
    """LoRA adapters that make `model` reply to each question's routing prompt with its label
    (`settings`: a `defaults().lm` dict), and the loss of every step. `model` is left unchanged: the
    `Trainer` trains adapters over its frozen weights."""
    examples = [pair(route_messages(q, n_members), str(int(label))) for q, label in zip(questions, labels)]
    data = DataConfig(batch_size=settings.batch_size, max_len=settings.max_len, epochs=settings.epochs, seed=seed)
    cfg = DistillConfig(data=data, learning_rate=settings.learning_rate, warmup_ratio=settings.warmup_ratio,
                        lora=lora_config(settings), seed=seed, remat=settings.remat)
    dataset = distill_dataset(examples, tokenizer, data)
    trainer = Trainer(model, cfg, len(dataset))
    history = trainer.fit(dataset)
    return jax.device_get(trainer.state.params), [float(h["loss"]) for h in history]


def label_loglik(model: Transformer, tokenizer: Tokenizer, questions: Sequence[str], n_members: int) -> np.ndarray:
    """`[questions, members]`: the log-likelihood of each label as the whole reply to each routing
    prompt (teacher-forced; one batched `completion_logprobs` call)."""
    labels = [tokenizer.encode(tokenizer.format_completion(str(i))) for i in range(n_members)]
    pairs = [(tokenizer.encode_chat(route_messages(q, n_members)), label) for q in questions for label in labels]
    return np.array([lp.sum() for lp in completion_logprobs(model, pairs)], np.float32).reshape(-1, n_members)


def adapter_arrays(adapters: lora_lib.Adapters) -> Arrays:
    """The adapters as named numpy arrays (safetensors-ready), `lora.<target>.<a|b>`."""
    return {f"lora.{target}.{ab}": np.asarray(x) for target, pair in adapters.items() for ab, x in pair.items()}


def adapters_from_arrays(arrays: Arrays, targets: Sequence[str]) -> lora_lib.Adapters:
    return {t: {ab: jnp.asarray(arrays[f"lora.{t}.{ab}"]) for ab in ("a", "b")} for t in targets}


# ---------------------------------------------------------------------- the shared router strategy


class RouterStrategy(Strategy):
    """Fit on dev (answers of every member, graded), route each item to one member, that member answers.

    Subclasses implement `fit` and `route`; the arrays `fit` returns are cached as safetensors, next
    to a JSON fingerprint and the fit answers (JSONL transcript)."""

    def fit(self, pool: Pool, items: Sequence[Example], scores: np.ndarray, confidence: np.ndarray,
            key: jax.Array) -> Arrays:
        """Router arrays from the dev `items`, their graded scores and answer confidences
        `[n, members]`; `key` drives initialisation and training."""
        raise NotImplementedError

    def route(self, pool: Pool, arrays: Arrays, items: Sequence[Example]) -> np.ndarray:
        """Member index per item."""
        raise NotImplementedError

    def run(self, pool: Pool, task: Task, split: str, rng: jax.Array) -> Result:
        fit_key, answer_key = jax.random.split(rng)
        arrays, fit_turns, fitted_now = self.fitted(pool, task, fit_key)
        items = task.split(split)
        choices = self.route(pool, arrays, items)
        transcript = list(fit_turns) if fitted_now else []
        transcript += [Turn(item_id=it.id, model=self.name, round=1, role=Role.ROUTE, prompt=list(it.messages),
                            output=pool.names[c]) for it, c in zip(items, choices)]
        reuse = self.config.reuse_fit_answers and split == "dev"
        if reuse:
            by_key = {(t.item_id, t.model): t for t in fit_turns}
            finals = [dataclasses.replace(by_key[(it.id, pool.names[c])], round=1) for it, c in zip(items, choices)]
            transcript += finals
        else:
            finals = answer_items(pool, choices, items, sampling_params(self.config.sampling, answer_key, 1), round=1,
                                  transcript=transcript)
        info = {"routes": [pool.names[c] for c in choices], "fit_cached": not fitted_now,
                "reused_fit_answers": reuse, "route_counts": np.bincount(choices, minlength=len(pool)).tolist()}
        return single_answer_result(self.name, items, finals, transcript, info)

    # ------------------------------------------------------------------ fit with cache

    def fitted(self, pool: Pool, task: Task, key: jax.Array) -> tuple[Arrays, list[Turn], bool]:
        """(router arrays, fit answer turns, whether the fit ran now): from the cache of this
        generation when its fingerprint matches, else fitted on dev and cached."""
        key_hash = fingerprint(self.config, task, task.dev, pool)
        cache = self.cache_dir(pool.generation)
        if cache is not None and (cache / "router.json").exists():
            meta = json.loads((cache / "router.json").read_text())
            if meta["fingerprint"] == key_hash:
                return (safetensors.numpy.load_file(str(cache / "router.safetensors")),
                        read_transcript(cache / "fit_transcript.jsonl"), False)
        arrays, turns, meta = self.fit_on_dev(pool, task, key)
        if cache is not None:
            self.save(cache, arrays, turns, {"fingerprint": key_hash, **meta})
        return arrays, turns, True

    def fit_on_dev(self, pool: Pool, task: Task, key: jax.Array) -> tuple[Arrays, list[Turn], dict[str, Any]]:
        """Every member answers every dev item (one `generate` call); answers graded; `fit` on them."""
        gen_key, fit_key = jax.random.split(key)
        dev, n = task.dev, len(pool)
        turns = answer_items(pool, [i for _ in dev for i in range(n)], [it for it in dev for _ in range(n)],
                             sampling_params(self.config.sampling, gen_key, 0), round=0, transcript=[])
        texts = [[turns[k * n + i].output for k in range(len(dev))] for i in range(n)]
        scores = np.stack([evaluate(texts[i], dev).correct for i in range(n)], axis=1).astype(np.float32)
        confidence = np.array([[np.mean(t.logprobs) if t.logprobs else -np.inf for t in turns[k * n:(k + 1) * n]]
                               for k in range(len(dev))], np.float32)
        arrays = self.fit(pool, dev, scores, confidence, fit_key)
        meta = {"members": pool.names, "dev_ids": [e.id for e in dev], "dev_scores": scores.tolist(),
                "dev_accuracy_per_member": scores.mean(0).tolist(), "oracle_dev_accuracy": float(scores.max(1).mean())}
        return arrays, turns, meta

    @staticmethod
    def save(cache: pathlib.Path, arrays: Arrays, turns: list[Turn], meta: dict[str, Any]) -> None:
        """Arrays, then fit transcript, then the JSON (written last: it marks the cache complete)."""
        safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()},
                                    str(cache / "router.safetensors"))
        write_transcript(turns, cache / "fit_transcript.jsonl")
        write_json(cache / "router.json", meta)


class EmbeddingRouter(RouterStrategy):
    """A router on question embeddings: the mean final hidden state of `router_member` over each
    question's chat prompt, standardised with the dev statistics (cached with the router's arrays).
    Subclasses implement `fit_embeddings` and `route_embeddings`."""

    def fit_embeddings(self, queries: jax.Array, scores: np.ndarray, confidence: np.ndarray, seed: int,
                       key: jax.Array) -> Arrays:
        """Router arrays from standardised dev question embeddings `[n, D]`, graded scores and answer
        confidences `[n, members]`; `seed` initialises the router, `key` drives training."""
        raise NotImplementedError

    def route_embeddings(self, arrays: Arrays, queries: jax.Array, n_members: int) -> np.ndarray:
        """Member index per standardised question embedding."""
        raise NotImplementedError

    def embed(self, pool: Pool, items: Sequence[Example]) -> np.ndarray:
        member = pool[self.config.router_member]
        return query_embeddings(member.model, member.tokenizer, [it.messages for it in items],
                                self.config.embed_batch_size)

    def fit(self, pool: Pool, items: Sequence[Example], scores: np.ndarray, confidence: np.ndarray,
            key: jax.Array) -> Arrays:
        embeddings = self.embed(pool, items)
        norm = norm_arrays(embeddings)
        init_key, train_key = jax.random.split(key)
        return {**norm, **self.fit_embeddings(jnp.asarray(standardize(embeddings, norm)), scores, confidence,
                                              seed_ints(init_key, 1)[0], train_key)}

    def route(self, pool: Pool, arrays: Arrays, items: Sequence[Example]) -> np.ndarray:
        return self.route_embeddings(arrays, jnp.asarray(standardize(self.embed(pool, items), arrays)), len(pool))


# ---------------------------------------------------------------------- the classification-head router


class RouterHead(nnx.Module):
    """Logits over members from a standardised question embedding: MLP (one hidden layer) or linear."""

    def __init__(self, dim: int, n_members: int, hidden: int, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(dim, hidden, rngs=rngs) if hidden > 0 else None
        self.out = nnx.Linear(hidden if hidden > 0 else dim, n_members, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(jax.nn.gelu(self.hidden(x)) if self.hidden is not None else x)


def _head_loss(head: RouterHead, data: tuple[jax.Array, jax.Array], key: jax.Array) -> jax.Array:
    x, labels = data
    return optax.softmax_cross_entropy_with_integer_labels(head(x), labels).mean()


def router_defaults(name: str, **settings) -> ml_collections.ConfigDict:
    """Settings every router shares, updated with the router's own (`settings`)."""
    config = ml_collections.ConfigDict(dict(
        name=name,
        router_member=0,          # the pool LM that routes: a LoRA copy (lm) or its question embeddings (mlp, gnn)
        embed_batch_size=16,      # rows per embedding forward
        steps=300,                # full-batch AdamW steps of the head on embeddings (mlp, gnn)
        learning_rate=3e-3,       # of those steps
        weight_decay=1e-2,
        reuse_fit_answers=True,   # on dev, the routed answer is the chosen member's fit answer
        sampling=sampling_defaults(),
    ))
    config.update(settings)
    return config


def defaults() -> ml_collections.ConfigDict:
    return router_defaults(
        "trained_router",
        router="lm",              # "lm": a LoRA-tuned pool LM names the member (the paper); "mlp": head on embeddings
        tie_break="likelihood",   # "likelihood" (own mean token log-prob) or "index" (lowest member index)
        hidden=64,                # mlp: head hidden width; 0 = linear head
        # router="lm": a copy of `router_member` fine-tuned with LoRA (the distillation Trainer: AdamW,
        # warmup + cosine) on one (routing prompt, label) pair per dev item
        lm=dict(
            lora_rank=8,          # adapter rank; the update is scaled by alpha / rank
            lora_alpha=16.0,
            lora_dropout=0.0,
            lora_targets=("q", "k", "v", "o", "gate", "up", "down"),
            epochs=8,             # passes over dev (default pool: 4 epochs route 76% of test right, 8 epochs 90%)
            batch_size=16,        # rows per optimizer step
            learning_rate=3e-3,   # default pool: 1e-3 and 1e-2 route worse (58%, 63% at 4 epochs)
            warmup_ratio=0.1,     # share of the steps warming up
            max_len=512,          # tokens of a routing example (longer prompts are dropped from the fit)
            remat=False,          # recompute layer blocks in the backward pass (big models)
        ),
    )


@register
class TrainedRouter(EmbeddingRouter):
    """The LM router (`router="lm"`) or the classification head on question embeddings (`"mlp"`)."""

    name = "trained_router"
    defaults = staticmethod(defaults)

    def __init__(self, config: ml_collections.ConfigDict, workdir=None):
        super().__init__(config, workdir)
        for key, allowed in (("tie_break", TIE_BREAKS), ("router", ROUTERS)):
            if self.config[key] not in allowed:
                raise ConfigError(f"config.strategy.{key}={self.config[key]!r}; expected one of {', '.join(allowed)}")

    def labels(self, scores: np.ndarray, confidence: np.ndarray) -> np.ndarray:
        """The best member per dev item, ties broken by `config.tie_break`."""
        return best_model_labels(scores, confidence if self.config.tie_break == "likelihood" else None)

    def fit(self, pool: Pool, items: Sequence[Example], scores: np.ndarray, confidence: np.ndarray,
            key: jax.Array) -> Arrays:
        if self.config.router == "mlp":
            return super().fit(pool, items, scores, confidence, key)
        labels = self.labels(scores, confidence)
        member = pool[self.config.router_member]
        adapters, losses = fit_lm_router(member.model, member.tokenizer, [it.question for it in items], labels,
                                         len(pool), self.config.lm, seed_ints(key, 1)[0])
        return {**adapter_arrays(adapters), "labels": labels.astype(np.int32), "losses": np.asarray(losses, np.float32)}

    def route(self, pool: Pool, arrays: Arrays, items: Sequence[Example]) -> np.ndarray:
        """mlp: the head's argmax; lm: the label the fine-tuned copy finds most likely (ties: lowest index)."""
        if self.config.router == "mlp":
            return super().route(pool, arrays, items)
        member, lm = pool[self.config.router_member], self.config.lm
        router = lora_lib.merge(member.model, adapters_from_arrays(arrays, lm.lora_targets), lora_config(lm))
        return np.argmax(label_loglik(router, member.tokenizer, [it.question for it in items], len(pool)), axis=1)

    def make_head(self, dim: int, n_members: int, seed: int = 0) -> RouterHead:
        return RouterHead(dim, n_members, self.config.hidden, rngs=nnx.Rngs(seed))

    def fit_embeddings(self, queries: jax.Array, scores: np.ndarray, confidence: np.ndarray, seed: int,
                       key: jax.Array) -> Arrays:
        c = self.config
        labels = self.labels(scores, confidence)
        head = self.make_head(queries.shape[1], scores.shape[1], seed)
        head, _ = train(head, _head_loss, (queries, jnp.asarray(labels)), c.steps, c.learning_rate, c.weight_decay, key)
        return {**module_arrays(head, "head"), "labels": labels.astype(np.int32)}

    def route_embeddings(self, arrays: Arrays, queries: jax.Array, n_members: int) -> np.ndarray:
        head = module_from_arrays(lambda: self.make_head(queries.shape[1], n_members), arrays, "head")
        return np.asarray(jnp.argmax(head(queries), axis=-1))
