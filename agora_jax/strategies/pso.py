"""Particle-swarm minimisation of a black-box function on a box (global-best PSO, Clerc constriction).

    x, fx, history = pso_minimize(f, dim=3, bounds=(0.0, 1.0), n_particles=8, iters=10, seed=0)

Used by `dare_ties` (mode "optimized") to search merge weights on dev accuracy; `f` is called once
per particle per iteration on the host (it may run a whole generation pass), so it need not be jittable.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

# Clerc & Kennedy (2002) constriction: inertia 0.7298, cognitive = social = 1.49618.
INERTIA, COGNITIVE, SOCIAL = 0.7298, 1.49618, 1.49618


@dataclasses.dataclass(frozen=True)
class PSOStep:
    """The swarm's best after one iteration (iteration 0 is the initial swarm)."""

    iteration: int
    best_x: np.ndarray
    best_f: float
    n_evaluations: int


def _bounds(bounds: tuple[float | Sequence[float], float | Sequence[float]], dim: int) -> tuple[np.ndarray, np.ndarray]:
    low = np.broadcast_to(np.asarray(bounds[0], np.float64), (dim,)).copy()
    high = np.broadcast_to(np.asarray(bounds[1], np.float64), (dim,)).copy()
    if np.any(high <= low):
        raise ValueError(f"PSO bounds need low < high in every dimension, got {low} and {high}")
    return low, high


def pso_minimize(
    f: Callable[[np.ndarray], float],
    dim: int,
    bounds: tuple[float | Sequence[float], float | Sequence[float]],
    n_particles: int = 16,
    iters: int = 50,
    seed: int = 0,
    init: Sequence[Sequence[float]] = (),
    inertia: float = INERTIA,
    cognitive: float = COGNITIVE,
    social: float = SOCIAL,
) -> tuple[np.ndarray, float, list[PSOStep]]:
    """Minimise `f` over the box `bounds` = (low, high) (scalars or per-dimension).

    Particles start uniformly in the box (the first ones at `init`, e.g. equal merge weights) with
    velocities uniform in +-(high - low) / 2; positions are clipped to the box and velocities to
    +-(high - low). Returns (best x, f(best x), per-iteration history). Deterministic given `seed`;
    ties keep the earlier point, so a constant `f` returns the first particle.
    """
    if dim < 1 or n_particles < 1 or iters < 0:
        raise ValueError(f"pso_minimize: dim={dim}, n_particles={n_particles}, iters={iters}")
    low, high = _bounds(bounds, dim)
    span = high - low
    rng = np.random.default_rng(seed)
    x = low + rng.uniform(size=(n_particles, dim)) * span
    for i, point in enumerate(list(init)[:n_particles]):
        x[i] = np.clip(np.asarray(point, np.float64), low, high)
    v = (rng.uniform(size=(n_particles, dim)) - 0.5) * span

    def evaluate(points: np.ndarray) -> np.ndarray:
        return np.array([float(f(p.copy())) for p in points])

    fx = evaluate(x)
    personal_x, personal_f = x.copy(), fx.copy()
    g = int(np.argmin(personal_f))
    history = [PSOStep(0, personal_x[g].copy(), float(personal_f[g]), n_particles)]
    for it in range(1, iters + 1):
        r1, r2 = rng.uniform(size=(2, n_particles, dim))
        v = inertia * v + cognitive * r1 * (personal_x - x) + social * r2 * (personal_x[g] - x)
        v = np.clip(v, -span, span)
        x = np.clip(x + v, low, high)
        fx = evaluate(x)
        improved = fx < personal_f
        personal_x[improved], personal_f[improved] = x[improved], fx[improved]
        g = int(np.argmin(personal_f))
        history.append(PSOStep(it, personal_x[g].copy(), float(personal_f[g]), n_particles * (it + 1)))
    return personal_x[g].copy(), float(personal_f[g]), history
