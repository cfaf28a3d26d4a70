"""Results of an evolution run: `results.json`, `report.md` (table), `accuracy.png` (plot) and
TensorBoard scalars (`tensorboard/`: accuracies per round, distillation loss per step).

`results.json` holds `{"single": {model: [acc_round0, ...]}, "multi": [acc_round0, ...], ...}` with
accuracies in [0, 1]; the report is rendered from it alone, so `launch/report.py DIR` can redo it.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import statistics
from typing import Any

RESULTS = "results.json"
REPORT = "report.md"
PLOT = "accuracy.png"
TENSORBOARD = "tensorboard"


def atomic_write_text(path: pathlib.Path, text: str) -> None:
    """Write through a temporary file and rename, so a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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


def markdown_table(results: dict[str, Any]) -> str:
    """Rounds as rows: each model, mean ± std over models, and the collaboration, in percent."""
    models = list(results["single"])
    header = ["round", *models, "single mean ± std", "collaboration"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r, multi in enumerate(results["multi"]):
        singles = [results["single"][m][r] for m in models]
        mean, std = mean_std(singles)
        row = [str(r), *(f"{100 * a:.1f}" for a in singles), f"{100 * mean:.1f} ± {100 * std:.1f}", f"{100 * multi:.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = list(range(len(results["multi"])))
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, accs in results["single"].items():
        ax.plot(rounds, [100 * a for a in accs], color="0.7", lw=1, marker=".", label=f"single: {name}")
    ax.plot(rounds, [100 * a for a in results["single_mean"]], color="C0", lw=2, marker="o", label="single: mean")
    ax.plot(rounds, [100 * a for a in results["multi"]], color="C3", lw=2, ls="--", marker="s", label="collaboration")
    ax.set(xlabel="round (generation)", ylabel="test accuracy (%)", xticks=rounds,
           title=f"{results.get('strategy', '')} on {results.get('task', '')}".strip())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def render(workdir: str | os.PathLike) -> pathlib.Path:
    """(Re)write `report.md` and `accuracy.png` from `results.json`; returns the report path."""
    workdir = pathlib.Path(workdir)
    results = load_results(workdir)
    plot(results, workdir / PLOT)
    title = f"# {results.get('strategy', 'evolution')} on {results.get('task', '')}"
    text = "\n\n".join([
        title.strip(),
        "Test accuracy (%) per round: every model alone, their mean ± std, and the collaboration.",
        markdown_table(results),
        f"![accuracy per round]({PLOT})",
    ]) + "\n"
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
        if r > 0 and len(results.get("dev_multi", [])) >= r:
            self.writer.add_scalar("dev/collaboration", results["dev_multi"][r - 1], r)
        self.writer.flush()

    def losses(self, tag: str, losses: list[float]) -> None:
        for step, loss in enumerate(losses):
            self.writer.add_scalar(_tag(tag), loss, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
