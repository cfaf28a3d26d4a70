"""What the benchmarks share: the machine description and appending result rows to BENCHMARKS.md."""

from __future__ import annotations

import os
import pathlib
import platform

REPO = pathlib.Path(__file__).resolve().parents[1]


def machine() -> str:
    """Architecture, cores, JAX device and the library versions, plus the load average (timings on a
    busy machine are slower; the side-by-side ratios are what to compare)."""
    import jax
    import torch
    import transformers

    return (f"{platform.machine()} {os.cpu_count()} cores, {jax.devices()[0].device_kind}; jax {jax.__version__}, "
            f"torch {torch.__version__}, transformers {transformers.__version__}; "
            f"load average {os.getloadavg()[1]:.1f}")


def append_rows(marker: str, section: str, rows: list[str]) -> None:
    """Insert `rows` before `marker` in BENCHMARKS.md, adding `section` (heading, text, table header)
    and the marker at the end of the file the first time."""
    path = REPO / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else ""
    if marker not in text:
        text += "\n" + section.rstrip("\n") + "\n" + marker + "\n"
    path.write_text(text.replace(marker, "".join(r + "\n" for r in rows) + marker))
