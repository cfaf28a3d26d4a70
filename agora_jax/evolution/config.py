"""The common base of every `configs/<strategy>.py`: one ml-collections ConfigDict drives a run.

Variants (`--config=configs/debate.py:smollm2`) start from `base_config(variant)` and change the
pool and the task; each strategy file sets `config.strategy`. Keys (`task.*` documented here,
`strategy.*` in each strategy module's `defaults()`, every other key where it is typed:
`agora_jax.evolution.settings`, the settings `evolve` hands down):

  seed, rounds                     the run's seed and R (paper default R = 3)
  pool.kind                        "scratch": tiny models trained here on the synthetic task (no downloads)
                                   "pretrained": `pool.models` are registry names, HF dirs, .gguf files or hub ids
  task.*                           which benchmark and split sizes (`agora_jax.tasks.task_from_spec`)
  strategy.*                       the strategy's settings (its module's `defaults()`), incl. its sampling
  evaluation.*                     how single models are evaluated on test (greedy)
  distill.*                        how collaborative outputs are distilled into every member
  engine.*                         the sampling engine's batch shapes
  mesh.*, checkpoint.*             sharding and retention

Every key a user sets is a scalar or a tuple, so each can be set from the command line:
`--config.pool.models=a,b,c` (`launch/main.py`: comma-separated) or `--config.pool.models="('a', 'b')"`.
`agora_jax.evolution.validate.validate` checks every setting before any model is built.
"""

from __future__ import annotations

import json

import ml_collections

from agora_jax.errors import ConfigError

POOL_KINDS = ("scratch", "pretrained")  # pool.kind
SLICINGS = ("expert", "random")  # pool.slicing

# Which settings may differ when a run is resumed in the same workdir (everything else must match).
RESUMABLE_KEYS = ("rounds", "checkpoint.max_to_keep",
                  "log_every")  # log_every: a setting that was never read, still in older workdirs' config.json


# Settings renamed since a workdir's config.json may have been written (old dotted key -> current): one
# name per setting, the trainer's (`DistillConfig.learning_rate`, `warmup_ratio`).
RENAMED_KEYS = {"distill.lr": "distill.learning_rate", "distill.warmup": "distill.warmup_ratio",
                "pool.pretrain_lr": "pool.pretrain_learning_rate", "strategy.lm.warmup": "strategy.lm.warmup_ratio"}


def current_names(saved: dict) -> dict:
    """A saved config (nested dicts, as in config.json) with its renamed settings under their current
    names (`RENAMED_KEYS`), so a workdir written before a rename is compared setting by setting."""
    out = json.loads(json.dumps(saved))
    for old, new in RENAMED_KEYS.items():
        *parents, leaf = old.split(".")
        node = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            node[new.rsplit(".", 1)[1]] = node.pop(leaf)
    return out


def task_config(name: str, n_dev: int, n_test: int) -> ml_collections.ConfigDict:
    """`task.*`: a built-in task name (`agora_jax.tasks.task_names()`), split sizes, the data root
    ("" = ../shared/data or $AGORA_JAX_DATA), and the knobs used when the task is `synthetic`
    (`agora_jax.tasks.synthetic.synthetic_task`): the default is two additions mod 10 after recalling
    a named constant, one of 26 letters with seeded values, so what a member knows (the letters of its
    group) is separate from the skill every member learns (adding digits mod 10)."""
    return ml_collections.ConfigDict(dict(
        name=name, n_dev=n_dev, n_test=n_test, seed=0, data_root="",
        # "c+4+7=" -> "c=3,3+4=7,7+7=4"
        synthetic=dict(digits=1, steps=2, ops="+", style="steps", n_train=1900, modulus=10, constants=26, pairs=0.0,
                       groups=3, anywhere=False),
    ))


# Pretrained pools on GPU/TPU: bf16 checkpoints from the hub on GSM8K, the paper's reference recipe.
_HUB = {
    "pool.kind": "pretrained", "pool.dtype": "bfloat16", "pool.compute_dtype": "bfloat16",
    "task": task_config("gsm8k", n_dev=500, n_test=500),
    "evaluation.max_new_tokens": 512,
    "distill.method": "supervised", "distill.epochs": 1, "distill.learning_rate": 1e-5, "distill.replay": 0.0,
    "distill.lora_rank": 64, "distill.buckets": (), "distill.remat": True, "distill.stack_students": False,
    "engine.max_batch": 64,  # a 3-member pool's prefill of 64 x 1024-token prompts fits 16 GiB chips
    "mesh.fsdp": -1, "mesh.tensor": 1,
}

# What each variant changes from the default (dotted keys, applied in order; `task` replaces the whole
# sub-config). `VARIANTS` are their names.
VARIANT_SETTINGS: dict[str, dict] = {
    "default": {},
    # three copies of the real SmolLM2-135M-Instruct on "What is 8 + 6?" with the boxed-number
    # instruction: greedy 44% right, the majority of 9 samples 77% (48 items): headroom a vote can
    # use and distillation can pass on. The 100 one-digit sums split into 48 test and 40 dev items.
    "smollm2": {
        "rounds": 1,
        "pool.kind": "pretrained", "pool.models": ("smollm2-135m-instruct",) * 3,
        "task": task_config("synthetic", n_dev=40, n_test=48),
        "task.synthetic": dict(digits=1, steps=1, ops="+", style="chat", n_train=1, modulus=0, constants=0,
                               pairs=0.0),
        "evaluation.max_new_tokens": 96,
        "distill.method": "supervised", "distill.epochs": 2,
        "distill.learning_rate": 1e-4,  # 10 steps of 8: the paper's 1e-5 moves a 135M model too little
        "distill.replay": 0.0, "distill.batch_size": 8,
        "distill.buckets": (192,),  # a ~45-token prompt + 96 new tokens
        # one copy's training at a time: three SmolLM2 students stacked in one fp32 step (8 x 192, no remat)
        # took 19.6 GB of RAM on the 2-core CPU and were killed there; one student takes ~3.5 GB
        "distill.stack_students": False,
    },
    "qwen2.5-1.5b": {**_HUB, "pool.models": ("Qwen/Qwen2.5-1.5B-Instruct",) * 3},
    "qwen2.5-7b": {**_HUB, "pool.models": ("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-Math-7B-Instruct",
                                           "Qwen/Qwen2-7B-Instruct")},
    "llama3.1-8b": {**_HUB, "pool.models": ("meta-llama/Llama-3.1-8B-Instruct",) * 3},
}
VARIANTS = tuple(VARIANT_SETTINGS)


def _set(c: ml_collections.ConfigDict, key: str, value) -> None:
    """`c.<key> = value` for a dotted key (a ConfigDict value is copied, a dict updates the sub-config)."""
    *parents, leaf = key.split(".")
    for part in parents:
        c = c[part]
    if isinstance(value, ml_collections.ConfigDict):
        c[leaf] = value.copy_and_resolve_references()
    elif isinstance(value, dict):
        c[leaf].update(value)
    else:
        c[leaf] = value


def make_task(cfg: ml_collections.ConfigDict):
    """The `agora_jax.tasks.Task` that `config.task` describes."""
    from agora_jax.tasks import task_from_spec

    fields = {k: v for k, v in cfg.to_dict().items() if k != "synthetic" and v != ""}
    if cfg.name == "synthetic":
        fields.update(cfg.synthetic.to_dict())
        fields.pop("data_root", None)
    try:
        return task_from_spec(fields)
    except KeyError as e:
        raise ConfigError(f"config.task.name: {e.args[0]}") from None


def base_config(variant: str | None, strategy: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config of `variant` running `strategy` (a strategy module's `defaults()`)."""
    variant = variant or "default"
    if variant not in VARIANTS:
        raise ConfigError(f"config variant {variant!r} is unknown; known: {', '.join(VARIANTS)}")
    c = ml_collections.ConfigDict()
    c.variant = variant
    c.seed = 0
    c.rounds = 3

    # the defaults of the sections `settings.py` types and documents, one field each
    c.pool = ml_collections.ConfigDict()
    c.pool.kind = "scratch"
    c.pool.models = ("m0", "m1", "m2")
    c.pool.dtype = "float32"
    c.pool.compute_dtype = "float32"
    c.pool.preset = "small"
    c.pool.pretrain_steps = 800
    c.pool.pretrain_batch = 16
    c.pool.pretrain_learning_rate = 3e-3
    c.pool.pretrain_check = 0.0
    c.pool.pretrain_attempts = 3
    c.pool.slicing = "expert"
    c.pool.pretrain_fraction = 0.005
    c.pool.shared_init = False

    c.task = task_config("synthetic", n_dev=500, n_test=200)  # dev: what the collaboration distills

    c.strategy = strategy
    c.evaluation = ml_collections.ConfigDict()
    c.evaluation.temperature = 0.0
    c.evaluation.max_new_tokens = 16

    c.distill = ml_collections.ConfigDict()
    c.distill.method = "multi_student"  # default pool: keeps the experts apart (see README)
    c.distill.logit = dict(source="collaboration", temperature=0.7)
    c.distill.epochs = 2
    c.distill.learning_rate = 3e-4
    c.distill.batch_size = 16
    c.distill.warmup_ratio = 0.1
    c.distill.lora_rank = 0
    c.distill.lora_alpha = 16.0
    c.distill.lora_dropout = 0.1
    c.distill.filter = "none"
    c.distill.replay = 1.0  # default pool: experts keep their own letters (see README)
    c.distill.min_agreement = 0.5
    c.distill.max_len = 512
    c.distill.buckets = (48, 64, 128, 256, 512)
    c.distill.remat = False
    c.distill.stack_students = True

    c.engine = ml_collections.ConfigDict()
    c.engine.max_batch = 256

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.max_to_keep = ml_collections.FieldReference(None, field_type=int)

    for key, value in VARIANT_SETTINGS[variant].items():
        _set(c, key, value)
    if "sampling" in c.strategy:  # collaboration answers as long as evaluation answers: one setting, two
        # names (a reference: `--config.evaluation.max_new_tokens=24` sets both, and so does the other name)
        c.strategy.sampling.max_new_tokens = c.evaluation.get_ref("max_new_tokens")
    _lists_as_tuples(c.strategy)
    return c


def _lists_as_tuples(config: ml_collections.ConfigDict) -> None:
    """Turns every list value (e.g. a strategy's `weights=[]`) into a tuple: ml-collections overrides
    tuples from the command line, not lists."""
    for key, value in list(config.items()):
        if isinstance(value, ml_collections.ConfigDict):
            _lists_as_tuples(value)
        elif isinstance(value, list):
            del config[key]  # a list field stays a list when assigned a tuple
            config[key] = tuple(value)
