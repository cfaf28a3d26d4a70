"""A seeds sweep: one resumable evolution per seed (`DIR/seed<k>/`, a `launch/main.py` run each) and
the effects of docs/method.md over seeds (`DIR/sweep.json`, `sweep.md`, `sweep.png`).

Method: every quantity gets its mean over the n seeds that finished and the 95% Student t interval
mean ± t(0.975, n - 1) · s / √n (s: the sample standard deviation, n - 1 in its denominator), with
the t quantile computed exactly for integer degrees of freedom (`t_quantile`). The effects are
paired per seed (each seed's own difference, then the interval over seeds):

    Δ1 = collaboration r0 - best member r0     (and against the compute-matched control's best member)
    Δ2 = members' mean rR - members' mean r0
    Δ3 = collaboration rR - collaboration r0

and a seed shows an effect when its Δ > 0. The statistics are pure functions of the seeds'
`results.json`; `run_sweep` runs the seeds (in parallel, each process on its own CPU cores) through a
`Runner`, so tests drive it without training anything.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import math
import os
import pathlib
import queue
import statistics
import subprocess
import time
from typing import Any, Callable, Sequence

from agora_jax.evolution import report
from agora_jax.evolution.config import current_names

SWEEP_JSON = "sweep.json"
SWEEP_MD = "sweep.md"
SWEEP_PLOT = "sweep.png"
CHILD_LOG = "sweep.log"  # each seed's stdout and stderr, appended run after run
LEVEL = 0.95
METHOD = ("mean over seeds and 95% Student t interval, mean ± t(0.975, n-1)·s/√n (s: sample standard deviation); "
          "effects paired per seed")

# what the per-round table shows, in its order: key -> column title
QUANTITIES = {"best_single": "best member", "single_mean": "members' mean", "collaboration": "collaboration",
              "control": "compute-matched control (best member)"}
# the effects: key -> (short name, definition)
EFFECTS = {"delta1": ("Δ1", "collaboration r0 - best member r0"),
           "delta1_control": ("Δ1 vs control", "collaboration r0 - compute-matched control r0"),
           "delta2": ("Δ2", "members' mean rR - r0"),
           "delta3": ("Δ3", "collaboration rR - r0")}

# runner(seed, seed workdir, CPU cores to run on) -> exit status of that seed's run
Runner = Callable[[int, pathlib.Path, list[int]], int]


# ---------------------------------------------------------------------------------------- statistics


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with integer `df` >= 1, exactly: the finite sums in cos²θ,
    θ = atan(t / √df), of Abramowitz & Stegun 26.7.3 (odd df) and 26.7.4 (even df)."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be a positive integer, got {df}")
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    total = 0.0
    if df % 2:  # A = 2/π (θ + sinθ (cosθ + 2/3 cos³θ + ... + (2·4···(df-3))/(1·3···(df-2)) cos^(df-2)θ))
        term = math.cos(theta)
        for j in range((df - 1) // 2):
            total += term
            term *= c2 * (2 * j + 2) / (2 * j + 3)
        inside = 2 / math.pi * (theta + math.sin(theta) * total)
    else:  # A = sinθ (1 + 1/2 cos²θ + ... + (1·3···(df-3))/(2·4···(df-2)) cos^(df-2)θ)
        term = 1.0
        for j in range(df // 2):
            total += term
            term *= c2 * (2 * j + 1) / (2 * j + 2)
        inside = math.sin(theta) * total
    return (1 + inside) / 2  # A = P(|T| < t), odd in t


def t_quantile(p: float, df: int) -> float:
    """The t with `t_cdf(t, df) == p`, by bisection to machine precision."""
    if not 0 < p < 1:
        raise ValueError(f"quantile level must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2 * hi
    while hi - lo > 1e-13 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def interval(values: Sequence[float], level: float = LEVEL) -> dict[str, Any]:
    """Mean and Student t interval of `values` (`low`/`high` None below two values, `mean` None for none)."""
    n = len(values)
    mean = statistics.fmean(values) if n else None
    low = high = None
    if n > 1:
        half = t_quantile((1 + level) / 2, n - 1) * statistics.stdev(values) / math.sqrt(n)
        low, high = mean - half, mean + half
    return {"n": n, "mean": mean, "low": low, "high": high, "values": list(values)}


def seed_curves(results: dict[str, Any], rounds: int) -> dict[str, list[float | None]]:
    """Rounds 0..`rounds` of one seed's results: best member, members' mean, collaboration, and the
    control's best member and samples per item (None for a round without a control)."""
    singles = [[accs[r] for accs in results["single"].values()] for r in range(rounds + 1)]
    control = results.get("control") or [None] * (rounds + 1)
    return {"best_single": [max(s) for s in singles], "single_mean": [statistics.fmean(s) for s in singles],
            "collaboration": list(results["multi"][:rounds + 1]),
            "control": [None if c is None else c["best"] for c in control[:rounds + 1]],
            "control_samples": [None if c is None else c["samples"] for c in control[:rounds + 1]]}


def seed_effects(curves: dict[str, list[float | None]], rounds: int) -> dict[str, float | None]:
    """One seed's Δ1 (also against the control; None without one), Δ2 and Δ3, R = `rounds`."""
    collab, control = curves["collaboration"], curves["control"][0]
    return {"delta1": collab[0] - curves["best_single"][0],
            "delta1_control": None if control is None else collab[0] - control,
            "delta2": curves["single_mean"][rounds] - curves["single_mean"][0],
            "delta3": collab[rounds] - collab[0]}


def aggregate(results_by_seed: dict[int, dict[str, Any]], rounds: int) -> dict[str, Any]:
    """`aggregate_curves` of each seed's results (`seed_curves`)."""
    return aggregate_curves({s: seed_curves(results, rounds) for s, results in results_by_seed.items()}, rounds)


def aggregate_curves(curves: dict[int, dict[str, list[float | None]]], rounds: int) -> dict[str, Any]:
    """Per round, each quantity's interval over seeds; per effect, its paired interval and how many
    seeds show it (Δ > 0); and each seed's effects. Seeds without a value (no control) are left out."""
    seeds = sorted(curves)
    per_seed = {s: seed_effects(curves[s], rounds) for s in seeds}
    per_round = []
    for r in range(rounds + 1):
        row: dict[str, Any] = {"round": r}
        for key in QUANTITIES:
            row[key] = interval([curves[s][key][r] for s in seeds if curves[s][key][r] is not None])
        row["control_samples"] = sorted({curves[s]["control_samples"][r] for s in seeds} - {None})
        per_round.append(row)
    effects = {}
    for key, (name, definition) in EFFECTS.items():
        shown = [s for s in seeds if per_seed[s][key] is not None]
        values = [per_seed[s][key] for s in shown]
        effects[key] = {"name": name, "definition": definition, "seeds": shown, **interval(values),
                        "positive": sum(v > 0 for v in values)}
    return {"method": METHOD, "level": LEVEL, "rounds": rounds, "seeds": seeds, "per_round": per_round,
            "effects": effects, "per_seed": {str(s): per_seed[s] for s in seeds}}


def curves_of(sweep: dict[str, Any], rounds: int, where: str = "sweep.json") -> dict[int, dict[str, list]]:
    """Each seed's curves as an earlier sweep.json records them (the per-round values, in seed order),
    so its seeds can join another sweep's statistics (`run_sweep(merge=...)`). A record that does not
    have `rounds` rounds or a value of every seed raises ValueError naming `where`."""
    stats = sweep.get("stats") or {}
    seeds, per_round = stats.get("seeds") or [], stats.get("per_round") or []
    if stats.get("rounds") != rounds or len(per_round) != rounds + 1:
        raise ValueError(f"{where}: a sweep of {stats.get('rounds')} rounds, expected {rounds}")
    curves: dict[int, dict[str, list]] = {s: {key: [] for key in (*QUANTITIES, "control_samples")} for s in seeds}
    for row in per_round:
        samples = row.get("control_samples") or []
        for key in QUANTITIES:
            values = row[key]["values"]
            if key == "control" and not values:
                values = [None] * len(seeds)
            if len(values) != len(seeds):
                raise ValueError(f"{where}: round {row['round']} has {len(values)} values of {key} for "
                                 f"{len(seeds)} seeds; only complete sweeps can be merged")
            for s, v in zip(seeds, values):
                curves[s][key].append(v)
        for s in seeds:
            has_control = curves[s]["control"][-1] is not None and len(samples) == 1
            curves[s]["control_samples"].append(samples[0] if has_control else None)
    return curves


# ---------------------------------------------------------------------------------------- rendering


def _with_ci(stat: dict[str, Any], fmt: Callable[[float], str]) -> tuple[str, str]:
    """(mean, "[low, high]") formatted: "n/a" for no value, "[n/a]" for an interval of fewer than two seeds."""
    if stat["mean"] is None:
        return "n/a", "n/a"
    return fmt(stat["mean"]), "[n/a]" if stat["low"] is None else f"[{fmt(stat['low'])}, {fmt(stat['high'])}]"


def _cell(stat: dict[str, Any]) -> str:
    """A per-round cell: "mean [low, high]" in percent, or "n/a"."""
    return "n/a" if stat["mean"] is None else " ".join(_with_ci(stat, report.pct))


def markdown(sweep: dict[str, Any]) -> str:
    """sweep.md: the runs, the per-round table (mean [95% CI], %), the effects (points) and each seed's."""
    runs, stats = sweep["runs"], sweep["stats"]
    rounds = [[str(row["round"]), *(_cell(row[key]) for key in QUANTITIES),
               ", ".join(map(str, row["control_samples"]))] for row in stats["per_round"]]
    effects = [[e["name"], e["definition"], *_with_ci(e, report.points), f"{e['positive']} / {e['n']}"]
               for e in stats["effects"].values()]
    per_seed = [[seed, *("n/a" if deltas[k] is None else report.points(deltas[k]) for k in EFFECTS)]
                for seed, deltas in stats["per_seed"].items()]
    blocks = [f"# Seeds sweep: {sweep['strategy']} on {sweep['task']}",
              f"Seeds {', '.join(map(str, sweep['seeds']))}: {len(stats['seeds'])} finished. Method: {METHOD}.",
              "Test accuracy (%) per round, mean over seeds [95% CI]:",
              report.table(["round", *QUANTITIES.values(), "control samples per item"], rounds),
              "Effects (points), paired per seed (R: the last round):",
              report.table(["effect", "definition", "mean", "95% CI", "seeds with Δ > 0"], effects),
              "Each seed's effects (points):",
              report.table(["seed", *(name for name, _ in EFFECTS.values())], per_seed)]
    failed = [f"seed {s} (exit {runs[str(s)]['returncode']}; output in seed{s}/{CHILD_LOG})" for s in sweep["seeds"]
              if runs[str(s)]["status"] == "failed"]
    if failed:
        blocks.append("Failed, left out of the statistics: " + ", ".join(failed) + ".")
    merged = {}
    for seed, run in runs.items():
        if run["status"] == "merged":
            merged.setdefault(run["from"], []).append(seed)
    if merged:
        blocks.insert(2, "Merged from earlier sweeps of the same config: " + "; ".join(
            f"seed{'s' if len(ss) > 1 else ''} {', '.join(ss)} ({path})" for path, ss in merged.items()) + ".")
    return "\n\n".join([*blocks, f"![sweep]({SWEEP_PLOT})"]) + "\n"


def plot(sweep: dict[str, Any], path: pathlib.Path) -> None:
    """Mean over seeds per round with its 95% CI as a band (cut to 0-100%), one line per quantity."""
    fig, ax = report.pyplot().subplots(figsize=(6, 4))
    per_round = sweep["stats"]["per_round"]
    for (key, label), color in zip(QUANTITIES.items(), ("C0", "0.5", "C3", "C2")):
        rows = [row for row in per_round if row[key]["mean"] is not None]
        ax.plot([row["round"] for row in rows], [100 * row[key]["mean"] for row in rows], color=color, marker="o",
                label=label)
        band = [row for row in rows if row[key]["low"] is not None]
        ax.fill_between([row["round"] for row in band], [max(0, 100 * row[key]["low"]) for row in band],
                        [min(100, 100 * row[key]["high"]) for row in band], color=color, alpha=0.15, lw=0)
    ax.set(xlabel="round (generation)", ylabel="test accuracy (%), mean and 95% CI over seeds",
           xticks=[row["round"] for row in per_round])
    report.save_figure(fig, ax, f"{sweep['strategy']} on {sweep['task']}, {len(sweep['stats']['seeds'])} seeds", path)


def write(workdir: pathlib.Path, sweep: dict[str, Any]) -> None:
    """sweep.json, sweep.md and sweep.png of `sweep` (each written whole, through a temporary file)."""
    report.atomic_write_text(workdir / SWEEP_JSON, json.dumps(sweep, indent=1))
    report.atomic_write_text(workdir / SWEEP_MD, markdown(sweep))
    plot(sweep, workdir / SWEEP_PLOT)


# ---------------------------------------------------------------------------------------- running seeds


def seed_dir(workdir: pathlib.Path, seed: int) -> pathlib.Path:
    return workdir / f"seed{seed}"


def finished(run_dir: pathlib.Path, rounds: int, config: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The results of a run in `run_dir` that has all rounds 0..`rounds` (and, when `config` is given,
    was made with exactly that config); None otherwise."""
    try:
        results = report.load_results(run_dir)
        saved = json.loads((run_dir / "config.json").read_text()) if config is not None else None
    except (FileNotFoundError, ValueError):
        return None
    if len(results["multi"]) <= rounds or saved != config:
        return None
    return results


def cpu_slots(cores: Sequence[int], jobs: int) -> list[list[int]]:
    """The cores of each of `jobs` concurrent runs: disjoint shares while there are enough cores,
    shared round-robin beyond that."""
    groups = [list(cores[j::min(jobs, len(cores))]) for j in range(min(jobs, len(cores)))]
    return [groups[j % len(groups)] for j in range(jobs)]


def available_cores() -> list[int]:
    """The CPU cores this process may run on."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def run_sweep(workdir: str | os.PathLike, seeds: Sequence[int], rounds: int, runner: Runner, jobs: int,
              config: dict[str, Any] | None = None, cores: Sequence[int] | None = None,
              log: Callable[[str], None] = print, merge: Sequence[str | os.PathLike] = ()) -> dict[str, Any]:
    """Run every seed that has not finished (`finished` with `config` and its seed), `jobs` at a time,
    then aggregate the finished seeds and write sweep.json/md/png; a failed seed is reported (status
    "failed", its exit status) and left out, the others kept. Returns the sweep record.

    `merge`: sweep.json files of earlier sweeps of the same config (other seeds, run elsewhere or before)
    whose seeds join the statistics (status "merged"); checked before any seed runs (`merged_curves`)."""
    workdir = pathlib.Path(workdir)
    merged = merged_curves(merge, seeds, rounds, config)
    workdir.mkdir(parents=True, exist_ok=True)
    expected = {s: None if config is None else {**config, "seed": s} for s in seeds}
    todo = [s for s in seeds if finished(seed_dir(workdir, s), rounds, expected[s]) is None]
    jobs = max(1, min(jobs, len(todo)))
    slots: queue.Queue[list[int]] = queue.Queue()
    for cpus in cpu_slots(cores or available_cores(), jobs):
        slots.put(cpus)
    runs: dict[str, dict[str, Any]] = {str(s): {"status": "done", "ran": False} for s in seeds if s not in todo}

    def one(seed: int) -> None:
        cpus = slots.get()
        start = time.monotonic()
        log(f"seed {seed}: running on cores {cpus} (output: {seed_dir(workdir, seed) / CHILD_LOG})")
        try:
            code = runner(seed, seed_dir(workdir, seed), cpus)
        finally:
            slots.put(cpus)
        ok = code == 0 and finished(seed_dir(workdir, seed), rounds, expected[seed]) is not None
        runs[str(seed)] = {"status": "done" if ok else "failed", "ran": True, "returncode": code,
                           "seconds": round(time.monotonic() - start, 1)}
        log(f"seed {seed}: {'done' if ok else 'FAILED'} (exit {code}) after {runs[str(seed)]['seconds']} s")

    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, todo))
    results = {s: finished(seed_dir(workdir, s), rounds, expected[s]) for s in seeds
               if runs[str(s)]["status"] == "done"}
    names = ({"strategy": config["strategy"]["name"], "task": config["task"]["name"]} if config
             else next(iter(results.values()), {}))
    curves = {s: seed_curves(r, rounds) for s, r in results.items()}
    for path, seed_curves_of_file in merged.items():
        curves.update(seed_curves_of_file)
        runs.update({str(s): {"status": "merged", "ran": False, "from": path} for s in seed_curves_of_file})
    every_seed = [*seeds, *(s for c in merged.values() for s in c)]
    sweep = {"strategy": names.get("strategy", ""), "task": names.get("task", ""), "seeds": every_seed,
             "runs": {str(s): runs[str(s)] for s in every_seed}, "config": config, "merged": list(merged),
             "stats": aggregate_curves(curves, rounds)}
    write(workdir, sweep)
    return sweep


def merged_curves(paths: Sequence[str | os.PathLike], seeds: Sequence[int], rounds: int,
                  config: dict[str, Any] | None) -> dict[str, dict[int, dict[str, list]]]:
    """The seeds' curves of each earlier sweep.json in `paths`, refused (ValueError naming the file) when
    unreadable, of another number of rounds, strategy or task, of a recorded config other than `config`
    (the seed aside), or sharing a seed with `seeds` or another file."""
    merged: dict[str, dict[int, dict[str, list]]] = {}
    taken = set(seeds)
    for path in map(str, paths):
        try:
            sweep = json.loads(pathlib.Path(path).read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: not a readable sweep.json ({err})") from None
        curves = curves_of(sweep, rounds, path)
        if config is not None:
            for key, value in (("strategy", config["strategy"]["name"]), ("task", config["task"]["name"])):
                if sweep.get(key) != value:
                    raise ValueError(f"{path}: a sweep of {key} {sweep.get(key)!r}, this one is {value!r}")
            recorded = sweep.get("config")
            if recorded is not None and {**current_names(recorded), "seed": None} != {**config, "seed": None}:
                raise ValueError(f"{path}: its config differs from this sweep's")
        if taken & set(curves):
            raise ValueError(f"{path}: seeds {sorted(taken & set(curves))} are already in the sweep")
        taken |= set(curves)
        merged[path] = curves
    return merged


def child_env(jobs: int, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every seed's process: with several at once on one accelerator, each
    preallocates only its share of the device memory (JAX's default is 75% for one process)."""
    env = dict(os.environ if environ is None else environ)
    if jobs > 1:
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / jobs:.3f}")
    return env


def subprocess_runner(command: Sequence[str], env: dict[str, str]) -> Runner:
    """A `Runner` that starts `command --config.seed=<k> --workdir=<seed dir>` with its output appended
    to `<seed dir>/sweep.log`, pinned to its cores (XLA sizes its thread pools to the cores a process
    may use, so concurrent seeds do not oversubscribe the CPU)."""

    def run(seed: int, run_dir: pathlib.Path, cpus: list[int]) -> int:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / CHILD_LOG, "a") as out:
            proc = subprocess.Popen([*command, f"--config.seed={seed}", f"--workdir={run_dir}"], stdout=out,
                                    stderr=subprocess.STDOUT, env=env)
            if hasattr(os, "sched_setaffinity"):
                with contextlib.suppress(ProcessLookupError):  # set before the child starts its threads
                    os.sched_setaffinity(proc.pid, cpus)
            return proc.wait()

    return run


def config_args(argv: Sequence[str]) -> list[str]:
    """The `--config=...` and `--config.key=value` arguments of `argv` (also in the two-token form
    `--config.key value`), in order: what every seed's run gets."""
    out: list[str] = []
    for k, arg in enumerate(argv):
        name = arg.split("=", 1)[0]
        if name != "--config" and not name.startswith("--config."):
            continue
        out.append(arg)
        if "=" not in arg and k + 1 < len(argv) and not argv[k + 1].startswith("-"):
            out.append(argv[k + 1])
    return out
