"""Run the evolution once per seed and report the effects over seeds with 95% confidence intervals:

    python launch/sweep.py --config=configs/debate.py --seeds=0,1,2,3,4 [--workdir=DIR] [--jobs=N] [--config.x=y ...]
                           [--merge=OTHER/sweep.json,...]

Every seed is a `launch/main.py` run in its own process (`DIR/seed<k>/`, `--config.seed=k`, the other
`--config` arguments as given), so each is kill-safe and resumable on its own: re-running the same
command skips the finished seeds and resumes the others. `--jobs` seeds run at once, each pinned to
its share of the CPU cores. The sweep writes DIR/sweep.json, sweep.md and sweep.png
(`agora_jax.evolution.sweep`: the method, per round and per effect); a failed seed is reported there,
left out of the statistics, and the sweep exits with status 1. `--merge` adds the seeds of earlier
sweeps of the same config (another machine, another session) to the statistics; a file of another
strategy, task, number of rounds or config, or one sharing a seed, is refused before anything runs.
"""

from __future__ import annotations

import json
import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without install

from agora_jax.evolution import sweep  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/<strategy>.py[:variant] file", lock_config=True)
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "comma-separated seeds, one evolution each")
_WORKDIR = flags.DEFINE_string("workdir", None, "sweep directory (default: workdir/<strategy>-<variant>-sweep)")
_JOBS = flags.DEFINE_integer("jobs", None, "seeds run at once (default: one per CPU core this process may use)")
_MERGE = flags.DEFINE_list("merge", [], "sweep.json files of earlier sweeps of the same config whose (other) seeds "
                           "join the statistics")
flags.mark_flags_as_required(["config"])


def seeds_of(values: list[str]) -> list[int]:
    """The distinct integer seeds of `--seeds`, in the order given."""
    try:
        seeds = [int(v) for v in values]
    except ValueError:
        raise app.UsageError(f"--seeds={','.join(values)}: expected comma-separated integers") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise app.UsageError(f"--seeds={','.join(values)}: expected distinct seeds, at least one")
    return seeds


def main(argv: list[str]) -> int:
    del argv
    config = _CONFIG.value
    seeds = seeds_of(_SEEDS.value)
    passed = sweep.config_args(sys.argv[1:])
    if any(arg.split("=", 1)[0] == "--config.seed" for arg in passed):
        raise app.UsageError("--config.seed: the sweep sets each run's seed; give the seeds with --seeds")
    jobs = len(sweep.available_cores()) if _JOBS.value is None else _JOBS.value
    if jobs < 1:
        raise app.UsageError(f"--jobs={jobs}: expected at least 1")
    workdir = pathlib.Path(_WORKDIR.value or f"workdir/{config.strategy.name}-{config.variant}-sweep")
    try:  # before any seed runs
        sweep.merged_curves(_MERGE.value, seeds, config.rounds, json.loads(config.to_json()))
    except ValueError as err:
        raise app.UsageError(f"--merge: {err}") from None
    runner = sweep.subprocess_runner([sys.executable, str(pathlib.Path(__file__).with_name("main.py")), *passed],
                                     sweep.child_env(min(jobs, len(seeds))))
    result = sweep.run_sweep(workdir, seeds, config.rounds, runner, jobs, config=json.loads(config.to_json()),
                             log=lambda line: print(line, flush=True), merge=_MERGE.value)
    print((workdir / sweep.SWEEP_MD).read_text())
    return 1 if any(run["status"] == "failed" for run in result["runs"].values()) else 0


if __name__ == "__main__":
    app.run(main)
