"""`graph_router` (API level): a GraphRouter-style GNN (Feng et al., ICLR 2025) picks the answering member.

Graph: one node per query and one per member; an edge joins every query to every member. Query node
features are question embeddings (mean final hidden state of `router_member`, standardised on dev);
member nodes are learned embeddings. An edge carries (score, observed): the graded dev score of that
member's answer where known, (0, 0) where not. Message passing (`layers` rounds, residual):
a query node takes the mean message from all its edges (member state + edge), a member node the mean
message from its *observed* edges (query state + edge), so queries whose scores are hidden never
inform the members. Edge prediction: an MLP on (query, member, edge) states gives the logit of the
edge's score; BCE against the graded score.

Fit (dev only, cached per generation): every member answers dev (one `generate` call), answers are
graded; each step hides the edges of a random `hide_fraction` of dev queries and is trained to
predict them from the rest (the same situation as a new query at test). Route: the queries to route
join the graph as hidden nodes next to all dev queries (observed); each goes to the member with the
highest predicted score (ties: lowest index). On dev the routed answers are the fit answers
(`reuse_fit_answers`). Final answers are the distillation examples.

Settings (`defaults()`): router_member, hidden, layers, hide_fraction, steps, learning_rate,
weight_decay, embed_batch_size, reuse_fit_answers, sampling.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from agora_jax.strategies.base import register
from agora_jax.strategies.trained_router import (Arrays, EmbeddingRouter, module_arrays, module_from_arrays,
                                                  router_defaults, train)


class GraphRouterNet(nnx.Module):
    """Bipartite query-member GNN with edge features; `__call__` gives edge logits `[queries, members]`."""

    def __init__(self, query_dim: int, n_members: int, hidden: int, layers: int, *, rngs: nnx.Rngs):
        self.query_in = nnx.Linear(query_dim, hidden, rngs=rngs)
        self.members = nnx.Param(jax.random.normal(rngs.params(), (n_members, hidden)) / np.sqrt(hidden))
        self.edge_in = nnx.Linear(2, hidden, rngs=rngs)
        self.to_query = nnx.List([nnx.Linear(2 * hidden, hidden, rngs=rngs) for _ in range(layers)])
        self.to_member = nnx.List([nnx.Linear(2 * hidden, hidden, rngs=rngs) for _ in range(layers)])
        self.edge_hidden = nnx.Linear(3 * hidden, hidden, rngs=rngs)
        self.edge_out = nnx.Linear(hidden, 1, rngs=rngs)

    def __call__(self, queries: jax.Array, scores: jax.Array, observed: jax.Array) -> jax.Array:
        """queries `[Q, D]`, scores `[Q, N]` (read only where `observed[q]`), observed `[Q]` bool."""
        q_count, n = scores.shape
        obs = jnp.broadcast_to(observed[:, None], (q_count, n)).astype(jnp.float32)
        edges = jax.nn.gelu(self.edge_in(jnp.stack([scores * obs, obs], -1)))  # [Q, N, H]
        hq = jax.nn.gelu(self.query_in(queries))
        hm = self.members[...]

        def spread(hq: jax.Array, hm: jax.Array) -> tuple[jax.Array, jax.Array]:  # both to [Q, N, H]
            shape = (q_count, n, hq.shape[-1])
            return jnp.broadcast_to(hq[:, None], shape), jnp.broadcast_to(hm[None], shape)

        for to_query, to_member in zip(self.to_query, self.to_member):
            bq, bm = spread(hq, hm)
            to_q = jax.nn.gelu(to_query(jnp.concatenate([bm, edges], -1))).mean(1)
            msgs = jax.nn.gelu(to_member(jnp.concatenate([bq, edges], -1)))
            to_m = jnp.sum(msgs * obs[..., None], 0) / jnp.maximum(jnp.sum(obs, 0), 1.0)[:, None]
            hq, hm = hq + to_q, hm + to_m
        bq, bm = spread(hq, hm)
        return self.edge_out(jax.nn.gelu(self.edge_hidden(jnp.concatenate([bq, bm, edges], -1))))[..., 0]


def _edge_loss(net: GraphRouterNet, data: tuple[jax.Array, jax.Array, jax.Array], key: jax.Array) -> jax.Array:
    """BCE of the predicted edge scores of a random `hide_fraction` of the queries, from the others."""
    queries, scores, hide_fraction = data
    hidden = jax.random.bernoulli(key, hide_fraction, (queries.shape[0],))
    per_query = optax.sigmoid_binary_cross_entropy(net(queries, scores, ~hidden), scores).mean(1)
    return jnp.sum(per_query * hidden) / jnp.maximum(jnp.sum(hidden), 1)


def defaults() -> ml_collections.ConfigDict:
    return router_defaults(
        "graph_router",
        hidden=32,                # node / edge state width
        layers=2,                 # message-passing rounds
        hide_fraction=0.5,        # share of dev queries whose edges are hidden (and predicted) per step
        steps=400,
        weight_decay=1e-4,
    )


@register
class GraphRouter(EmbeddingRouter):
    name = "graph_router"
    defaults = staticmethod(defaults)

    def make_net(self, dim: int, n_members: int, seed: int = 0) -> GraphRouterNet:
        c = self.config
        return GraphRouterNet(dim, n_members, c.hidden, c.layers, rngs=nnx.Rngs(seed))

    def fit_embeddings(self, queries: jax.Array, scores: np.ndarray, confidence: np.ndarray, seed: int,
                       key: jax.Array) -> Arrays:
        c = self.config
        net = self.make_net(queries.shape[1], scores.shape[1], seed)
        data = (queries, jnp.asarray(scores), jnp.float32(c.hide_fraction))
        net, _ = train(net, _edge_loss, data, c.steps, c.learning_rate, c.weight_decay, key)
        return {**module_arrays(net, "gnn"), "dev.queries": np.asarray(queries), "dev.scores": scores}

    def route_embeddings(self, arrays: Arrays, queries: jax.Array, n_members: int) -> np.ndarray:
        """The queries join the dev graph as nodes whose edges are hidden; argmax of their edge scores."""
        dev_queries, dev_scores = arrays["dev.queries"], arrays["dev.scores"]
        net = module_from_arrays(lambda: self.make_net(queries.shape[1], n_members), arrays, "gnn")
        n_dev = len(dev_queries)
        logits = net(jnp.concatenate([jnp.asarray(dev_queries), queries]),
                     jnp.concatenate([jnp.asarray(dev_scores), jnp.zeros((len(queries), n_members))]),
                     jnp.arange(n_dev + len(queries)) < n_dev)
        return np.asarray(jnp.argmax(logits[n_dev:], axis=-1))
