"""Every setting is checked before any work: `validate` refuses bad settings with one ConfigError
naming the key, `evolve` calls it before touching the workdir, and `launch/main.py` turns every bad
setting, from a mistyped key to an unknown variant, into one `error:` line and exit status 1."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys
from typing import Any

import pytest

from agora_jax.evolution.config import VARIANTS, ConfigError
from agora_jax.evolution.validate import validate

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.py"))


def _config(name: str, variant: str | None = None):
    spec = importlib.util.spec_from_file_location(f"agora_config_{name[:-3]}", REPO / "configs" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def _set(config, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[leaf] = value


# (config file[:variant], settings, the key the error must name)
BAD = [
    ("debate.py", {"strategy.name": "nope"}, "strategy.name"),
    ("debate.py", {"variant": "nope"}, "variant"),
    ("debate.py", {"rounds": -1}, "rounds"),
    ("debate.py", {"seed": -3}, "seed"),
    ("debate.py", {"distill.method": "telepathy"}, "distill.method"),
    ("debate.py", {"distill.filter": "nope"}, "distill.filter"),
    ("debate.py", {"distill.learning_rate": 0.0}, "distill.learning_rate"),
    ("debate.py", {"distill.logit.source": "oracle"}, "distill.logit.source"),
    ("debate.py", {"distill.learning_rate": float("nan")}, "distill.learning_rate"),
    ("debate.py", {"distill.epochs": 0}, "distill.epochs"),
    ("debate.py", {"distill.warmup_ratio": 1.0}, "distill.warmup_ratio"),
    ("debate.py", {"distill.buckets": (48, 0)}, "distill.buckets"),
    ("debate.py", {"pool.kind": "remote"}, "pool.kind"),
    ("debate.py", {"pool.slicing": "by_letter"}, "pool.slicing"),
    ("debate.py", {"pool.preset": "huge"}, "pool.preset"),
    ("debate.py", {"pool.pretrain_learning_rate": -1e-3}, "pool.pretrain_learning_rate"),
    ("debate.py", {"pool.models": ()}, "pool.models"),
    ("debate.py", {"pool.models": ("m0", "m0")}, "pool.models"),
    ("debate.py", {"task.name": "gsm9k"}, "task.name"),
    ("debate.py", {"task.n_dev": 0}, "task.n_dev"),
    ("debate.py", {"task.n_test": 0}, "task.n_test"),
    ("debate.py", {"task.synthetic.n_train": 0}, "task.synthetic.n_train"),
    ("debate.py", {"task.synthetic.ops": "+/"}, "task.synthetic.ops"),
    ("debate.py", {"task.synthetic.pairs": 1.5}, "task.synthetic.pairs"),
    ("debate.py", {"task.synthetic.pairs": 0.3, "task.synthetic.constants": 4}, "task.synthetic.pairs"),
    ("debate.py", {"task.synthetic.pairs": 0.3, "task.synthetic.groups": 4}, "task.synthetic.groups"),
    ("debate.py", {"task.name": "gsm8k", "task.data_root": "/nonexistent/data"}, "task.data_root"),
    ("debate.py", {"evaluation.max_new_tokens": 0}, "evaluation.max_new_tokens"),
    ("debate.py", {"strategy.sampling.max_new_tokens": 0}, "evaluation.max_new_tokens"),  # one setting
    ("debate.py", {"strategy.sampling.temperature": -1.0}, "strategy.sampling"),
    ("debate.py", {"strategy.sampling.top_p": 1.5}, "strategy.sampling"),
    ("debate.py", {"strategy.select": "best"}, "strategy.select"),
    ("debate.py", {"strategy.num_agents": -1}, "strategy.num_agents"),
    ("debate.py", {"mesh.data": 3}, "mesh"),  # does not divide this host's device
    ("debate.py", {"mesh.fsdp": 0}, "mesh.fsdp"),
    ("debate.py", {"engine.max_batch": 0}, "engine.max_batch"),
    ("debate.py", {"checkpoint.max_to_keep": 0}, "checkpoint.max_to_keep"),
    ("agora.py", {"strategy.verify": "oracle"}, "strategy.verify"),
    ("agora.py", {"strategy.judge": "vibes"}, "strategy.judge"),
    ("agora.py", {"strategy.dedup": "hash"}, "strategy.dedup"),
    ("agora.py", {"strategy.elite_mode": "all"}, "strategy.elite_mode"),
    ("agora.py", {"strategy.elite_k": 4}, "strategy.elite_k"),  # a pool of 3
    ("blender.py", {"strategy.judge": "coin"}, "strategy.judge"),
    ("blender.py", {"strategy.ranker": 3}, "strategy.ranker"),
    ("trained_router.py", {"strategy.tie_break": "random"}, "strategy.tie_break"),
    ("trained_router.py", {"strategy.router": "gnn"}, "strategy.router"),
    ("trained_router.py", {"strategy.lm.learning_rate": -1.0}, "strategy.lm.learning_rate"),
    ("graph_router.py", {"strategy.learning_rate": 0.0}, "strategy.learning_rate"),
    ("dare_ties.py", {"strategy.mode": "ties"}, "strategy.mode"),
    ("dare_ties.py", {"strategy.pso.low": 1.0}, "strategy.pso.low"),
    ("dare_ties.py", {"strategy.base": "/nonexistent/base.gguf"}, "strategy.base"),
    ("moa.py", {"strategy.aggregator": 3}, "strategy.aggregator"),
    ("refine.py", {"strategy.final_member": 5}, "strategy.final_member"),
    ("multiagent_ft.py", {"strategy.rounds": 1}, "strategy.rounds"),
    ("multiagent_ft.py", {"strategy.generation_agents": (0, 0)}, "strategy.generation_agents"),
    ("logit_fusion.py", {"strategy.weights": (1.0, 2.0)}, "strategy.weights"),  # 3 members
    ("self_consistency.py", {"strategy.samples": 0}, "strategy.samples"),
    ("debate.py:smollm2", {"pool.models": ("/nonexistent/model.gguf",)}, "pool.models[0]"),
    ("debate.py:smollm2", {"pool.models": ("smollm2-135m-instruct", "./no/such/dir")}, "pool.models[1]"),
    ("debate.py:smollm2", {"pool.models": ("smollm3",)}, "pool.models[0]"),  # no registry name, path or hub id
    ("debate.py:smollm2", {"distill.replay": 1.0}, "distill.replay"),  # needs the scratch pool's own data
]


def test_bad_settings_table_is_large():
    assert len(BAD) >= 25


@pytest.mark.parametrize("config_name,settings,key", BAD, ids=[f"{c}:{k}" for c, _, k in BAD])
def test_bad_setting_is_refused_naming_the_key(config_name, settings, key):
    name, _, variant = config_name.partition(":")
    config = _config(name, variant or None)
    validate(config)  # the good config passes ...
    for k, v in settings.items():
        _set(config, k, v)
    with pytest.raises(ConfigError) as error:  # ... and one bad setting is refused
        validate(config)
    message = str(error.value)
    assert message.startswith(f"config.{key}") and "\n" not in message, message


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_and_variant_is_valid(name):
    for variant in VARIANTS:
        validate(_config(name, variant))


def test_lists_are_tuples_so_the_command_line_can_set_them():
    for name in CONFIGS:
        config = _config(name)
        assert isinstance(config.pool.models, tuple) and isinstance(config.distill.buckets, tuple)
        lists = [k for k, v in config.strategy.items() if isinstance(v, list)]
        assert not lists, f"{name}: strategy keys {lists} are lists"


def test_evolve_refuses_before_any_work(tmp_path):
    from agora_jax.evolution.loop import evolve

    config = _config("debate.py")
    config.distill.filter = "nope"
    with pytest.raises(ConfigError, match="config.distill.filter"):
        evolve(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------ launch/main.py

# (name, arguments after --workdir, what the one error line must hold)
CLI = [
    ("mistyped_key", ["--config=configs/debate.py", "--config.no_such_key=1"], "--config.no_such_key"),
    ("unknown_variant", ["--config=configs/debate.py:nope"], "variant 'nope'"),
    ("strategy_name", ["--config=configs/debate.py", "--config.strategy.name=nope"], "config.strategy.name='nope'"),
    ("rounds", ["--config=configs/debate.py", "--config.rounds=-1"], "config.rounds=-1"),
    # list keys from the command line, shown by an error that depends on the value they were set to
    ("models_commas", ["--config=configs/refine.py", "--config.pool.models=m0,m1", "--config.strategy.final_member=2"],
     "config.strategy.final_member=2: expected -1 or a member index in 0..1 (the pool has 2)"),
    ("models_tuple", ["--config=configs/refine.py", "--config.pool.models=('m0','m1','m2','m3')",
                      "--config.strategy.final_member=4"], "(the pool has 4)"),
    ("buckets_commas", ["--config=configs/debate.py", "--config.distill.buckets=48,0"],
     "config.distill.buckets=(48, 0): expected integers >= 1"),
]


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, pathlib.Path]]:
    """Every CLI case, launched at once (each one's cost is its jax import)."""
    root = tmp_path_factory.mktemp("cli")
    procs = {}
    for name, args, _ in CLI:
        workdir = root / name
        procs[name] = workdir, subprocess.Popen([sys.executable, "launch/main.py", f"--workdir={workdir}", *args],
                                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs = {}
    for name, (workdir, proc) in procs.items():
        out, err = proc.communicate(timeout=300)  # the default pool trains for minutes: a miss times out
        runs[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err), workdir
    return runs


@pytest.mark.parametrize("name,args,expected", CLI, ids=[c[0] for c in CLI])
def test_main_refuses_with_one_error_line(cli_runs, name, args, expected):
    run, workdir = cli_runs[name]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert run.returncode == 1 and len(errors) == 1, run.stderr[-2000:]
    assert expected in errors[0], errors[0]
    assert "Traceback" not in run.stderr, run.stderr[-2000:]
    assert not workdir.exists()  # no pool/, no checkpoint, not even the log: nothing was built or trained


def test_answer_length_is_one_setting_for_evaluation_and_collaboration():
    """`evaluation.max_new_tokens` set on the command line reaches the strategy's sampling (and the
    other name sets both): a collaboration cut short of the evaluation's length would grade truncated
    answers."""
    for name in ("evaluation", "strategy.sampling"):
        config = _config("debate.py")
        config.lock()  # as the launcher's flags hold it: an override sets an existing field
        _set(config, f"{name}.max_new_tokens", 24)
        assert config.evaluation.max_new_tokens == config.strategy.sampling.max_new_tokens == 24
        assert json.loads(config.to_json())["strategy"]["sampling"]["max_new_tokens"] == 24


def test_a_workdir_written_before_the_renames_compares_under_the_current_names(tmp_path):
    """config.json of a run from before `distill.lr` became `distill.learning_rate` (and the other
    `RENAMED_KEYS`) is the same config; a changed value under an old name is still refused."""
    from agora_jax.evolution.config import RENAMED_KEYS
    from agora_jax.evolution.store import IncompatibleWorkdirError, RunStore

    config = _config("debate.py")
    saved = json.loads(config.to_json())
    for old, new in RENAMED_KEYS.items():
        *parents, leaf = new.split(".")
        node = saved
        for part in parents:
            node = node.get(part, {})
        if leaf in node:
            node[old.rsplit(".", 1)[1]] = node.pop(leaf)
    assert "lr" in saved["distill"] and "learning_rate" not in saved["distill"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    RunStore(tmp_path, None).check_config(config)  # accepted
    saved["distill"]["lr"] = 1.0
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(IncompatibleWorkdirError, match="distill.learning_rate"):
        RunStore(tmp_path, None).check_config(config)


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_typed_settings_hold_every_key_of_the_run_sections_value_for_value(variant):
    """`settings_of` has a field for every key but the task's and the strategy's (which keep their
    ConfigDict sections), with the config's value: a key added to the config needs its field."""
    import dataclasses

    from agora_jax.evolution.settings import settings_of
    from agora_jax.evolution.store import _flatten

    config = _config("debate.py", variant)
    keys = {k: v for k, v in _flatten(json.loads(config.to_json())).items()
            if not k.startswith(("task.", "strategy."))}
    typed = _flatten(json.loads(json.dumps(dataclasses.asdict(settings_of(config)))))
    assert typed == keys
    run = settings_of(config)
    assert isinstance(run.distill.buckets, tuple) and isinstance(run.pool.models, tuple)
