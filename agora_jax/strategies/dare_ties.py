"""`dare_ties` (weight level): merge the members' task vectors with DARE + TIES; the merged model answers.

Settings (`defaults()`):
    mode         "average": equal merge weights; "optimized": particle-swarm search of the merge
                 weights (`pso_minimize`) maximising dev accuracy, fit on dev and cached per generation
    base_member  index of the pool member whose weights are the base of the task vectors (-1: none)
    base_path    a checkpoint (anything `agora_jax.models.load` reads) to use as base ("" : none)
                 Neither given: the base is the elementwise mean of the pool (our choice; the papers
                 merge fine-tunes of a shared pretrained model, which an evolving pool need not have).
    drop_p       DARE drop probability p (survivors rescaled by 1/(1-p)); 0 disables DARE
    density      TIES trim: fraction of each task-vector tensor kept by magnitude; 1 disables the trim
                 (defaults p=0.5 and density=0.2 follow the DARE paper's DARE-then-TIES setting and
                 TIES' default top-20%)
    scale        lambda in base + lambda * merged task vector
    merge_seed   seed of the DARE masks: the merge is a function of (pool, config), not of the run's
                 rng, so the weights PSO fit on dev give the same model at test
    pso          n_particles, iters, low, high (bounds of every weight), seed, dev_items (first k dev
                 items score a particle; 0 = all). Particle 0 starts at equal weights, so the result is
                 never worse on the scored dev items than mode "average".
    sampling     decoding of the merged model's answers (PSO scoring uses it with one fixed seed)
"""

from __future__ import annotations

import json

import jax
import ml_collections
import numpy as np
from flax import nnx

from agora_jax.models import load
from agora_jax.strategies.base import Result, Strategy, fingerprint, register, single_answer_result, write_json
from agora_jax.strategies.merging import MergedModel, dare_ties, param_tree, weighted_mean
from agora_jax.strategies.pool import Pool, answer_items, sampling_defaults, sampling_params
from agora_jax.strategies.pso import pso_minimize
from agora_jax.tasks import Task, evaluate

MODES = ("average", "optimized")


def defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="dare_ties", mode="average", base_member=-1, base_path="", drop_p=0.5, density=0.2, scale=1.0,
        merge_seed=0,
        pso=dict(n_particles=8, iters=5, low=0.0, high=1.0, seed=0, dev_items=0),
        sampling=sampling_defaults(),
    ))


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

    def base(self, pool: Pool):
        c = self.config
        if c.base_member >= 0 and c.base_path:
            raise ValueError("dare_ties: give base_member or base_path, not both")
        if c.base_member >= 0:
            return param_tree(pool[c.base_member].model)
        if c.base_path:
            return param_tree(load(c.base_path, dtype=pool[0].model.config.param_dtype)[0])
        return weighted_mean([param_tree(m.model) for m in pool.members])

    def merge(self, pool: Pool, base, weights) -> nnx.State:
        c = self.config
        return dare_ties([param_tree(m.model) for m in pool.members], base, weights, drop_p=c.drop_p,
                         density=c.density, scale=c.scale, key=jax.random.key(c.merge_seed))

    def run(self, pool: Pool, task: Task, split: str, rng: jax.Array) -> Result:
        fit_key, answer_key = jax.random.split(rng)
        base = self.base(pool)
        info: dict = {"mode": self.config.mode}
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
        """PSO over merge weights minimising minus the merged model's dev accuracy; cached per generation."""
        c = self.config
        dev = task.dev[:c.pso.dev_items] if c.pso.dev_items > 0 else task.dev
        key_hash = fingerprint(c, task, dev, pool)
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
