"""`dare_ties` (weight level): merge the members' task vectors with DARE + TIES; the merged model answers.

Settings (`defaults()`):
    mode         "average": equal merge weights; "optimized": particle-swarm search of the merge
                 weights (`pso_minimize`) maximising dev accuracy, fit on dev and cached per generation
    base         the checkpoint the members were fine-tuned from (registry name, HF dir or .gguf:
                 anything `agora_jax.models.load` reads); task vectors are member minus base. ""
                 (default): the pool's own common base (`Pool.base`: the shared initialisation of a
                 scratch pool built with `pool.shared_init`, or the one checkpoint of a pretrained pool
                 of copies). A pool with neither is refused (docs/method.md §1): task vectors over
                 unrelated initialisations, or over the pool's mean, merge nothing meaningful.
    drop_p       DARE drop probability p (survivors rescaled by 1/(1-p)); 0 disables DARE
    density      TIES trim: fraction of each task-vector tensor kept by magnitude; 1 disables the trim
                 (defaults p=0.5 and density=0.2 follow the DARE paper's DARE-then-TIES setting and
                 TIES' default top-20%)
    scale        lambda in base + lambda * merged task vector
    merge_seed   seed of the DARE masks: the merge is a function of (pool, config), not of the run's
                 rng, so the weights PSO fit on dev give the same model at test
    pso          n_particles, iters, low, high (bounds of every weight), seed, dev_items (first k dev
                 items score a particle; 0 = all). Particle 0 starts at equal weights, so the result is
                 never worse on the scored dev items than mode "average". The fit is cached under the
                 `fingerprint` of the settings, dev items and members' weights, and the base's digest.
    sampling     decoding of the merged model's answers (PSO scoring uses it with one fixed seed)
"""

from __future__ import annotations

import hashlib
import json

import jax
import ml_collections
import numpy as np
from flax import nnx

from agora_jax.errors import ConfigError
from agora_jax.models import load
from agora_jax.records import Result
from agora_jax.strategies.base import Strategy, fingerprint, register, single_answer_result, write_json
from agora_jax.strategies.merging import MergedModel, check_compatible, dare_ties, param_tree
from agora_jax.pool import Pool, params_digest
from agora_jax.strategies.rounds import answer_items, sampling_defaults, sampling_params
from agora_jax.strategies.pso import pso_minimize
from agora_jax.tasks import Task, evaluate

MODES = ("average", "optimized")


def defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="dare_ties", mode="average", base="", drop_p=0.5, density=0.2, scale=1.0, merge_seed=0,
        pso=dict(n_particles=8, iters=5, low=0.0, high=1.0, seed=0, dev_items=0),
        sampling=sampling_defaults(),
    ))


def task_vector_base(base: str, pool_base: str | None) -> str:
    """What the task vectors are relative to: `strategy.base`, else the pool's common base; a pool
    with no common base is refused (checked by `build_pool` before any training, and at run time)."""
    if not (base or pool_base):
        raise ConfigError("dare_ties merges task vectors relative to the members' common base, and this pool has "
                          "none: set config.strategy.base to the checkpoint the members were fine-tuned from, or, "
                          "for a scratch pool, config.pool.shared_init=True")
    return base or pool_base


def _placed_like(x: jax.Array, like: jax.Array) -> jax.Array:
    """`x` with `like`'s sharding, moved only when it differs (a moved array is committed to its
    devices, and committed inputs compile the merge and the merged model's engine anew)."""
    return x if x.sharding == like.sharding else jax.device_put(x, like.sharding)


@register
class DareTies(Strategy):
    """DARE drop-and-rescale + TIES sign election over the pool's task vectors (one architecture)."""

    name = "dare_ties"
    defaults = staticmethod(defaults)

    def __init__(self, config: ml_collections.ConfigDict, workdir=None):
        super().__init__(config, workdir)
        if self.config.mode not in MODES:
            raise ValueError(f"dare_ties: mode must be one of {MODES}, got {self.config.mode!r}")
        self.merged = MergedModel(self.name)
        self._base: tuple[str, nnx.State] | None = None

    def base(self, pool: Pool) -> tuple[str, nnx.State]:
        """The base (`task_vector_base`) and its parameters, loaded once, placed like member 0's."""
        source = task_vector_base(self.config.base, pool.base)
        if self._base is None or self._base[0] != source:
            tree, like = param_tree(load(source, dtype=pool[0].model.config.param_dtype)[0]), param_tree(pool[0].model)
            try:
                check_compatible([like, tree])
            except ValueError:
                raise ConfigError(f"dare_ties: the base {source!r} (config.strategy.base, or the pool's common base) "
                                  "has other parameter shapes or dtypes than the pool's members") from None
            self._base = source, jax.tree.map(_placed_like, tree, like)
        return self._base

    def merge(self, pool: Pool, base, weights) -> nnx.State:
        c = self.config
        return dare_ties([param_tree(m.model) for m in pool.members], base, weights, drop_p=c.drop_p,
                         density=c.density, scale=c.scale, key=jax.random.key(c.merge_seed))

    def teacher_model(self, pool: Pool, info: dict) -> nnx.Module:
        """The merged model a `run` with this `info` answered with: the logit-KD teacher of its examples
        (docs/method.md §1, method 3), rebuilt from the stored weights, so a resumed round gets the same."""
        return self.merged.load(pool, self.merge(pool, self.base(pool)[1], info["weights"]))[0].model

    def run(self, pool: Pool, task: Task, split: str, rng: jax.Array) -> Result:
        fit_key, answer_key = jax.random.split(rng)
        source, base = self.base(pool)
        info: dict = {"mode": self.config.mode, "base": source}
        if self.config.mode == "optimized":
            weights, info["pso"] = self.fit_weights(pool, task, base, fit_key)
        else:
            weights = [1.0 / len(pool)] * len(pool)
        info["weights"] = weights
        merged = self.merged.load(pool, self.merge(pool, base, weights))
        items, transcript = task.split(split), []
        finals = answer_items(merged, [0] * len(items), items, sampling_params(self.config.sampling, answer_key, 1),
                              round=1, transcript=transcript)
        return single_answer_result(self.name, items, finals, transcript, info)

    def fit_weights(self, pool: Pool, task: Task, base, key: jax.Array) -> tuple[list[float], dict]:
        """PSO over merge weights minimising minus the merged model's dev accuracy; cached per generation
        under the members' and the base's weights."""
        c = self.config
        dev = task.dev[:c.pso.dev_items] if c.pso.dev_items > 0 else task.dev
        key_hash = hashlib.sha256((fingerprint(c, task, dev, pool) + params_digest(base)).encode()).hexdigest()
        cache = self.cache_dir(pool.generation)
        path = cache / "merge_weights.json" if cache is not None else None
        if path is not None and path.exists():
            saved = json.loads(path.read_text())
            if saved["fingerprint"] == key_hash:
                return saved["weights"], {**saved["pso"], "cached": True}
        params = sampling_params(c.sampling, key, 0)  # one seed for every particle: scores differ by weights only

        def minus_dev_accuracy(w: np.ndarray) -> float:
            merged = self.merged.load(pool, self.merge(pool, base, [float(x) for x in w]))
            turns = answer_items(merged, [0] * len(dev), dev, params, round=0, transcript=[])
            return -evaluate([t.output for t in turns], dev).accuracy

        n = len(pool)
        best, best_f, history = pso_minimize(minus_dev_accuracy, n, (c.pso.low, c.pso.high), c.pso.n_particles,
                                             c.pso.iters, c.pso.seed, init=[[1.0 / n] * n])
        weights = [float(x) for x in best]
        pso = {"dev_accuracy": -best_f, "history": [-h.best_f for h in history],
               "evaluations": history[-1].n_evaluations, "cached": False}  # their answers stay out of the transcript
        if path is not None:
            write_json(path, {"fingerprint": key_hash, "weights": weights, "pso": pso})
        return weights, pso
