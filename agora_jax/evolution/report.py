"""Results of an evolution run: `results.json`, `report.md` (table), `accuracy.png` (plot) and
TensorBoard scalars (`tensorboard/`: accuracies per round, distillation loss per step).

`results.json` holds `{"single": {model: [acc_round0, ...]}, "multi": [acc_round0, ...], "control":
[{"samples": k, "single": {model: acc}, "best": acc, ...}, ...], ...}` with accuracies in [0, 1]
(`control`: the compute-matched control of each round, `agora_jax.evolution.control`); the report is
rendered from it alone, so `launch/report.py DIR` can redo it.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import statistics
from typing import Any

from agora_jax.atomic import atomic_path, atomic_write_text

RESULTS = "results.json"
REPORT = "report.md"
PLOT = "accuracy.png"
TENSORBOARD = "tensorboard"
CONTROL_NOTE = ("Compute-matched control: each model alone samples as many answers per test item as the "
                "collaboration generated messages per item (control samples), with the strategy's sampling "
                "settings, and answers their majority (self-consistency); vs best single and vs best control: "
                "the collaboration minus each, in points.")


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Add per-round mean and std over the single models (`single_mean`, `single_std`)."""
    per_round = list(zip(*results["single"].values()))
    stats = [mean_std(list(r)) for r in per_round]
    return {**results, "single_mean": [m for m, _ in stats], "single_std": [s for _, s in stats]}


def write_results(workdir: pathlib.Path, results: dict[str, Any]) -> dict[str, Any]:
    results = summarize(results)
    atomic_write_text(workdir / RESULTS, json.dumps(results, indent=2))
    return results


def load_results(workdir: pathlib.Path) -> dict[str, Any]:
    path = pathlib.Path(workdir) / RESULTS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no results yet (has the run finished a round?)")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    for key in ("single", "multi"):
        if key not in results:
            raise ValueError(f"{path}: missing key {key!r}")
    return summarize(results)


def table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *("| " + " | ".join(cells) + " |" for cells in rows)])


def markdown_table(results: dict[str, Any]) -> str:
    """Rounds as rows: each model, mean ± std over models, and the collaboration, in percent; when the
    run has a compute-matched control, then its samples per item, each model's k-sample vote, the best
    vote, and effect 1 (collaboration minus best single model, minus best vote) in points."""
    models = list(results["single"])
    controls = results.get("control", [])
    with_control = any(c is not None for c in controls)
    rows = []
    for r, multi in enumerate(results["multi"]):
        singles = [results["single"][m][r] for m in models]
        mean, std = mean_std(singles)
        rows.append([str(r), *map(pct, singles), f"{pct(mean)} ± {pct(std)}", pct(multi)])
        if with_control:
            rows[-1] += control_cells(controls[r] if r < len(controls) else None, models, multi, max(singles))
    header = ["round", *models, "single mean ± std", "collaboration"]
    if with_control:
        header += ["control samples", *(f"{m} control" for m in models), "best control", "vs best single",
                   "vs best control"]
    return table(header, rows)


def control_cells(control: dict[str, Any] | None, models: list[str], multi: float, best_single: float) -> list[str]:
    """The control's cells of one round's row ("n/a" for a round without one)."""
    if control is None:
        return ["n/a"] * (len(models) + 2) + [points(multi - best_single), "n/a"]
    return [str(control["samples"]), *(pct(control["single"][m]) for m in models), pct(control["best"]),
            points(multi - best_single), points(multi - control["best"])]


def tokens_line(results: dict[str, Any]) -> str:
    """Generated tokens per test item of the collaboration and of one model's control, per round."""
    spent = [f"round {r}: {c['collaboration_tokens_per_item']:.1f} / {c['tokens_per_item']:.1f}"
             for r, c in enumerate(results.get("control", [])) if c is not None]
    return "Generated tokens per test item, collaboration / one model's control: " + "; ".join(spent) + "."


def pct(x: float) -> str:
    """An accuracy in [0, 1] as percent."""
    return f"{100 * x:.1f}"


def points(x: float) -> str:
    """A difference of accuracies as signed percentage points."""
    return f"{100 * x:+.1f}"


def effect1_line(results: dict[str, Any]) -> str:
    """Effect 1 at round 0, stated against the best single member and against the compute-matched control."""
    multi, best_single = results["multi"][0], max(accs[0] for accs in results["single"].values())
    text = (f"Effect 1 (round 0): the collaboration's {pct(multi)} against the best single member's "
            f"{pct(best_single)}: {points(multi - best_single)} points")
    control = (results.get("control") or [None])[0]
    if control is None:
        return text + "."
    return (text + f"; against the compute-matched control, the best member's majority of {control['samples']} "
            f"samples per item ({pct(control['best'])}): {points(multi - control['best'])} points.")


def plot(results: dict[str, Any], path: pathlib.Path) -> None:
    rounds = list(range(len(results["multi"])))
    fig, ax = pyplot().subplots(figsize=(6, 4))
    for name, accs in results["single"].items():
        ax.plot(rounds, [100 * a for a in accs], color="0.7", lw=1, marker=".", label=f"single: {name}")
    ax.plot(rounds, [100 * a for a in results["single_mean"]], color="C0", lw=2, marker="o", label="single: mean")
    ax.plot(rounds, [100 * a for a in results["multi"]], color="C3", lw=2, ls="--", marker="s", label="collaboration")
    control = [(r, 100 * c["best"]) for r, c in enumerate(results.get("control", [])) if c is not None]
    if control:
        xs, ys = zip(*control)
        ax.plot(xs, ys, color="C2", lw=1.5, ls=":", marker="^", label="control: best member, k-sample vote")
    ax.set(xlabel="round (generation)", ylabel="test accuracy (%)", xticks=rounds)
    save_figure(fig, ax, f"{results.get('strategy', '')} on {results.get('task', '')}".strip(), path)


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, ax, title: str, path: pathlib.Path) -> None:
    """Title, grid and legend, then write `path` through a temporary file (a reader never sees half a PNG)."""
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format=path.suffix.lstrip("."))
    pyplot().close(fig)


def render(workdir: str | os.PathLike) -> pathlib.Path:
    """(Re)write `report.md` and `accuracy.png` from `results.json`; returns the report path."""
    workdir = pathlib.Path(workdir)
    results = load_results(workdir)
    plot(results, workdir / PLOT)
    title = f"# {results.get('strategy', 'evolution')} on {results.get('task', '')}"
    parts = [title.strip(),
             "Test accuracy (%) per round: every model alone, their mean ± std, and the collaboration.",
             markdown_table(results), effect1_line(results)]
    if any(c is not None for c in results.get("control", [])):
        parts += [CONTROL_NOTE, tokens_line(results)]
    text = "\n\n".join([*parts, f"![accuracy per round]({PLOT})"]) + "\n"
    atomic_write_text(workdir / REPORT, text)
    return workdir / REPORT


def _tag(name: str) -> str:
    """A TensorBoard tag from a model name: "smollm2-135m-instruct#2" -> "smollm2-135m-instruct_2"
    (TensorBoard would rename it itself, with one warning per scalar)."""
    return re.sub(r"[^\w./-]", "_", name)


class Board:
    """TensorBoard scalars of a run (`tensorboard --logdir WORKDIR/tensorboard`); a resumed run appends
    to the same directory, and a repeated (round, tag) shows its last value."""

    def __init__(self, workdir: pathlib.Path):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(pathlib.Path(workdir) / TENSORBOARD))

    def round(self, r: int, results: dict[str, Any]) -> None:
        """Accuracies of round `r`: every single model, their mean and std, the collaboration (test and dev)."""
        results = summarize(results)
        for name, accs in results["single"].items():
            self.writer.add_scalar(_tag(f"test/single/{name}"), accs[r], r)
        self.writer.add_scalar("test/single_mean", results["single_mean"][r], r)
        self.writer.add_scalar("test/single_std", results["single_std"][r], r)
        self.writer.add_scalar("test/collaboration", results["multi"][r], r)
        control = results.get("control", [None] * (r + 1))[r]
        if control is not None:
            self.writer.add_scalar("test/control_best", control["best"], r)
        if r > 0 and len(results.get("dev_multi", [])) >= r:
            self.writer.add_scalar("dev/collaboration", results["dev_multi"][r - 1], r)
        self.writer.flush()

    def losses(self, tag: str, losses: list[float]) -> None:
        for step, loss in enumerate(losses):
            self.writer.add_scalar(_tag(tag), loss, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
