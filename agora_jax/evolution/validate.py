"""Every setting of a run checked before any model is built or trained.

`validate(config)` raises one `ConfigError` naming the first bad key and what it accepts, so a
mistyped choice or an impossible size fails in seconds instead of after pool training and round 0.
The allowed values of choice keys are declared next to the key's default (`METHODS`, `FILTERS`,
`POOL_KINDS`, a strategy module's tuples, ...) and imported here; ranges are the `RULES` tables.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from agora_jax.distill.lora import LORA_TARGETS
from agora_jax.evolution.config import POOL_KINDS, SLICINGS, VARIANTS, ConfigError
from agora_jax.evolution.distillation import FILTERS, LOGIT_SOURCES, METHODS
from agora_jax.models import PRESETS, make_mesh
from agora_jax.models.registry import REGISTRY
from agora_jax.sampling import SamplingParams
from agora_jax.strategies import STRATEGIES
from agora_jax.strategies.agora import DEDUPS, ELITE_MODES, VERIFIERS
from agora_jax.strategies.dare_ties import MODES
from agora_jax.strategies.debate import SELECTS, TARGETS
from agora_jax.strategies.judging import JUDGE_MODES
from agora_jax.strategies.trained_router import ROUTERS, TIE_BREAKS
from agora_jax.tasks import task_names
from agora_jax.tasks.synthetic import MAX_CONSTANTS, OPERATORS, STYLES

# A check takes a value and the pool's size; it returns what the key accepts when the value is bad, else None.
Check = Callable[[Any, int], "str | None"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def one_of(allowed: Sequence[Any]) -> Check:
    """A choice key."""
    return lambda value, n: None if value in tuple(allowed) else f"one of {', '.join(map(repr, allowed))}"


def integer(low: int, high: int | None = None) -> Check:
    """An integer in [low, high]."""
    expected = f"an integer >= {low}" + (f" and <= {high}" if high is not None else "")
    return lambda value, n: None if _is_int(value) and low <= value and (high is None or value <= high) else expected


def real(low: float = -math.inf, high: float = math.inf, *, open_low: bool = False, open_high: bool = False) -> Check:
    """A finite number in the interval from low to high (ends open or closed)."""
    expected = f"a finite number in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"

    def check(value: Any, n: int) -> str | None:
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
              and (value > low if open_low else value >= low) and (value < high if open_high else value <= high))
        return None if ok else expected
    return check


POSITIVE = real(0.0, open_low=True)
FRACTION = real(0.0, 1.0, open_high=True)  # a share in [0, 1): dropout, warmup
SHARE = real(0.0, 1.0)
FLAG = one_of((False, True))


def member(optional: bool = False) -> Check:
    """A pool member's index (or -1 = none / chosen by the strategy, when `optional`)."""
    def check(value: Any, n: int) -> str | None:
        ok = _is_int(value) and (-1 if optional else 0) <= value < n
        return None if ok else f"{'-1 or ' if optional else ''}a member index in 0..{n - 1} (the pool has {n})"
    return check


def agent_count(value: Any, n: int) -> str | None:
    """How many of the pool's members (1..n)."""
    return integer(1, n)(value, n)


def members(value: Any, n: int) -> str | None:
    """Distinct member indices (empty: the strategy's default)."""
    ok = isinstance(value, (tuple, list)) and len(set(value)) == len(value) and all(
        member()(m, n) is None for m in value)
    return None if ok else f"distinct member indices in 0..{n - 1}, e.g. (0, 1)"


def weights(value: Any, n: int) -> str | None:
    """Empty (equal weights) or one finite weight >= 0 per member, not all zero."""
    ok = isinstance(value, (tuple, list)) and (not value or (
        len(value) == n and all(real(0.0)(w, n) is None for w in value) and sum(value) > 0))
    return None if ok else f"() or {n} finite weights >= 0 with a positive sum"


def lengths(value: Any, n: int) -> str | None:
    """Padded batch lengths: integers >= 1 (empty: powers of two)."""
    ok = isinstance(value, (tuple, list)) and all(integer(1)(v, n) is None for v in value)
    return None if ok else "integers >= 1, e.g. (64, 128), or () for powers of two"


def subset(allowed: Sequence[str]) -> Check:
    """Items (of a tuple, or characters of a string) drawn from `allowed`, at least one."""
    def check(value: Any, n: int) -> str | None:
        ok = isinstance(value, (str, tuple, list)) and len(value) > 0 and set(value) <= set(allowed)
        return None if ok else f"a non-empty selection of {', '.join(map(repr, allowed))}"
    return check


def dtype(value: Any, n: int) -> str | None:
    """A floating-point dtype name."""
    try:
        ok = isinstance(value, str) and jnp.issubdtype(jnp.dtype(value), jnp.floating)
    except TypeError:
        ok = False
    return None if ok else "a floating dtype name, e.g. 'float32' or 'bfloat16'"


def mesh_axis(value: Any, n: int) -> str | None:
    """A mesh axis size; -1 takes the devices the other axes leave."""
    ok = _is_int(value) and (value >= 1 or value == -1)
    return None if ok else "an integer >= 1, or -1 for the remaining devices"


def optional(check: Check) -> Check:
    """`check`, or None (unset)."""
    return lambda value, n: None if value is None else check(value, n)


def sampling(value: Any, n: int) -> str | None:
    """Decoding settings that make a `SamplingParams` (its own checks say what is wrong)."""
    try:
        SamplingParams(**value.to_dict())
    except (TypeError, ValueError) as e:
        return f"valid decoding settings ({e})"
    return None


def template(value: Any, n: int) -> str | None:
    """A reply template the strategy fills with an answer."""
    ok = isinstance(value, str) and "{answer}" in value
    return None if ok else "a string holding '{answer}'"


def model_source(value: Any, n: int) -> str | None:
    """What `agora_jax.models.load` reads: a registry name, an existing path (HF directory, .gguf),
    or a hub id ("org/name"); empty: none."""
    text = str(value)
    if not text or text in REGISTRY or pathlib.Path(text).expanduser().exists():
        return None
    if not text.startswith(("/", ".", "~")) and not text.endswith(".gguf") and text.count("/") == 1:
        return None  # a hub id
    return f"an existing path, a registry name ({', '.join(REGISTRY)}) or a hub id (no such file or directory)"


# Settings of every run, by dotted key (a key the config lacks is not checked).
RULES: dict[str, Check] = {
    "variant": one_of(VARIANTS),
    "seed": integer(0),
    "rounds": integer(0),
    "pool.kind": one_of(POOL_KINDS),
    "pool.dtype": dtype,
    "pool.compute_dtype": dtype,
    "pool.preset": one_of(tuple(PRESETS)),
    "pool.pretrain_steps": integer(1),
    "pool.pretrain_batch": integer(1),
    "pool.pretrain_learning_rate": POSITIVE,
    "pool.pretrain_check": real(0.0, 1.0),
    "pool.pretrain_attempts": integer(1),
    "pool.slicing": one_of(SLICINGS),
    "pool.pretrain_fraction": real(0.0, 1.0, open_low=True),
    "pool.shared_init": FLAG,
    "task.name": one_of(task_names()),
    "task.n_dev": integer(1),
    "task.n_test": integer(1),
    "task.seed": integer(0),
    "task.synthetic.digits": integer(1),
    "task.synthetic.steps": integer(1),
    "task.synthetic.ops": subset(OPERATORS),
    "task.synthetic.style": one_of(STYLES),
    "task.synthetic.n_train": integer(1),
    "task.synthetic.modulus": integer(0),
    "task.synthetic.constants": integer(0, MAX_CONSTANTS),
    "task.synthetic.pairs": real(0.0, 1.0),
    "task.synthetic.groups": integer(2),
    "task.synthetic.anywhere": FLAG,
    "evaluation.temperature": real(0.0),
    "evaluation.max_new_tokens": integer(1),
    "distill.method": one_of(METHODS),
    "distill.filter": one_of(FILTERS),
    "distill.logit.source": one_of(LOGIT_SOURCES),
    "distill.logit.temperature": real(0.0),
    "distill.epochs": integer(1),
    "distill.learning_rate": POSITIVE,
    "distill.batch_size": integer(1),
    "distill.warmup_ratio": FRACTION,
    "distill.lora_rank": integer(0),
    "distill.lora_alpha": POSITIVE,
    "distill.lora_dropout": FRACTION,
    "distill.replay": real(0.0),
    "distill.min_agreement": SHARE,
    "distill.max_len": integer(2),
    "distill.buckets": lengths,
    "distill.remat": FLAG,
    "distill.stack_students": FLAG,
    "engine.max_batch": integer(1),
    "mesh.data": mesh_axis,
    "mesh.fsdp": mesh_axis,
    "mesh.tensor": mesh_axis,
    "checkpoint.max_to_keep": optional(integer(1)),
}

# Settings of `config.strategy` that mean the same in every strategy that has them.
STRATEGY_RULES: dict[str, Check] = {
    "sampling": sampling,
    "judge_sampling": sampling,
    "samples": integer(1),
    "rounds": integer(1),
    "num_agents": integer(0),
    "layers": integer(0),
    "top_k": integer(1),
    "router_member": member(),
    "ranker": member(),
    "fuser": member(),
    "aggregator": member(),
    "final_member": member(optional=True),
    "proposers": members,
    "generation_agents": members,
    "critic_agents": members,
    "weights": weights,
    "fuse": FLAG,
    "both_orders": FLAG,
    "reuse_fit_answers": FLAG,
    "learning_rate": POSITIVE,
    "weight_decay": real(0.0),
    "steps": integer(1),
    "embed_batch_size": integer(1),
    "hidden": integer(0),
    "hide_fraction": real(0.0, 1.0, open_low=True),
    "min_peer_score": SHARE,
    "min_agreement": SHARE,
    "self_weight": real(0.0),
    "patience": integer(1),
    "elite_k": agent_count,
    "elite_weight": POSITIVE,
    "answer_template": template,
    "corrected_fraction": SHARE,
    "base": model_source,
    "drop_p": FRACTION,
    "density": real(0.0, 1.0, open_low=True),
    "scale": real(),
    "merge_seed": integer(0),
    "pso.n_particles": integer(1),
    "pso.iters": integer(0),
    "pso.low": real(),
    "pso.high": real(),
    "pso.seed": integer(0),
    "pso.dev_items": integer(0),
    "lm.lora_rank": integer(1),
    "lm.lora_alpha": POSITIVE,
    "lm.lora_dropout": FRACTION,
    "lm.lora_targets": subset(LORA_TARGETS),
    "lm.epochs": integer(1),
    "lm.batch_size": integer(1),
    "lm.learning_rate": POSITIVE,
    "lm.warmup_ratio": FRACTION,
    "lm.max_len": integer(2),
}

# Settings whose meaning is the strategy's own (registry name -> key -> check); they take precedence.
STRATEGY_CHOICES: dict[str, dict[str, Check]] = {
    "debate": {"select": one_of(SELECTS), "target": one_of(TARGETS)},
    "agora": {"verify": one_of(VERIFIERS), "judge": one_of(JUDGE_MODES), "dedup": one_of(DEDUPS),
              "elite_mode": one_of(ELITE_MODES)},
    "llm_blender": {"judge": one_of(JUDGE_MODES)},
    "trained_router": {"router": one_of(ROUTERS), "tie_break": one_of(TIE_BREAKS)},
    "dare_ties": {"mode": one_of(MODES)},
    "multiagent_finetuning": {"rounds": integer(2)},
}


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises `ConfigError` naming the first setting of `config` that cannot work; returns None when
    every setting is usable. Reads no data and builds no model (the mesh check lists the devices)."""
    _finite(config, "config")
    n = _pool_size(config)
    for key, check in RULES.items():
        _check(config, key, check, n)
    _check(config, "strategy.name", one_of(sorted(STRATEGIES)), n)
    rules = {**STRATEGY_RULES, **STRATEGY_CHOICES.get(config.strategy.name, {})}
    for key, check in rules.items():
        _check(config, f"strategy.{key}", check, n)
    _cross_checks(config)


def _lookup(config: ml_collections.ConfigDict, key: str) -> tuple[bool, Any]:
    """(present, value) of a dotted key."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _check(config: ml_collections.ConfigDict, key: str, check: Check, n: int) -> None:
    present, value = _lookup(config, key)
    if present and (expected := check(value, n)) is not None:
        shown = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
        raise ConfigError(f"config.{key}={shown!r}: expected {expected}")


def _finite(node: Any, path: str) -> None:
    """No NaN or infinity anywhere: no setting means them."""
    if isinstance(node, ml_collections.ConfigDict):
        for key, value in node.items():
            _finite(value, f"{path}.{key}")
    elif isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"{path}={node!r}: expected a finite number")


def _pool_size(config: ml_collections.ConfigDict) -> int:
    """Checks `pool.models` (by `pool.kind`) and returns how many members the pool has."""
    models = config.pool.models
    if not isinstance(models, (tuple, list)) or not models:
        raise ConfigError(f"config.pool.models={models!r}: expected a non-empty tuple, e.g. --config.pool.models=a,b,c")
    for i, source in enumerate(models):
        if config.pool.kind == "pretrained" and (expected := model_source(source, len(models))):
            raise ConfigError(f"config.pool.models[{i}]={source!r}: expected {expected}")
        if config.pool.kind == "scratch" and not (isinstance(source, str) and source and "/" not in source):
            raise ConfigError(f"config.pool.models[{i}]={source!r}: expected a member name (a scratch pool's "
                              "members are trained here and saved as workdir/pool/<name>)")
    if config.pool.kind == "scratch" and len(set(models)) != len(models):
        raise ConfigError(f"config.pool.models={tuple(models)!r}: expected distinct member names")
    return len(models)


def _cross_checks(config: ml_collections.ConfigDict) -> None:
    """Settings that are fine alone but not together, and the mesh against this host's devices."""
    if config.distill.replay and config.pool.kind != "scratch":
        raise ConfigError(f"config.distill.replay={config.distill.replay}: replay needs the pool's own training "
                          f"data, which only pool.kind='scratch' has (got {config.pool.kind!r}); set it to 0")
    present, pso = _lookup(config, "strategy.pso")
    if present and not pso.low < pso.high:
        raise ConfigError(f"config.strategy.pso.low={pso.low} and pso.high={pso.high}: expected low < high")
    if config.task.name == "synthetic" and config.task.synthetic.get("pairs"):
        synthetic = config.task.synthetic
        if synthetic.constants < 2 * synthetic.groups:
            raise ConfigError(f"config.task.synthetic.pairs={synthetic.pairs}: problems naming two experts' letters "
                              f"need constants >= 2 x groups (got constants={synthetic.constants}, "
                              f"groups={synthetic.groups})")
        if config.pool.kind == "scratch" and config.pool.slicing == "expert" and synthetic.groups != len(config.pool.models):
            raise ConfigError(f"config.task.synthetic.groups={synthetic.groups}: the experts whose letters a pair "
                              f"combines are the pool's members, so groups must be len(pool.models)="
                              f"{len(config.pool.models)}")
    if config.task.name != "synthetic" and config.task.data_root:
        if not pathlib.Path(config.task.data_root).expanduser().is_dir():
            raise ConfigError(f"config.task.data_root={config.task.data_root!r}: no such directory")
    mesh = config.mesh
    try:
        devices = make_mesh(mesh.data, mesh.fsdp, mesh.tensor)
    except ValueError as e:
        raise ConfigError(f"config.mesh (data={mesh.data}, fsdp={mesh.fsdp}, tensor={mesh.tensor}): {e} "
                          f"(this host has {jax.device_count()} devices)") from None
    rows = devices.shape["data"] * devices.shape["fsdp"]  # distillation batches split over data x fsdp
    if devices.size > 1 and config.distill.batch_size % rows:
        raise ConfigError(f"config.distill.batch_size={config.distill.batch_size}: the mesh splits every "
                          f"distillation batch over data x fsdp = {rows} devices; use a multiple of {rows}")
