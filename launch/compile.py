"""Compile every program of a run for a TPU topology on this (CPU-only) machine and check it fits.

    python launch/compile.py --config=configs/debate.py:qwen2.5-7b --topology=v5e:4x4
    python launch/compile.py --config=configs/agora.py:llama3.1-8b --topology=v4:2x2x4 --config.mesh.tensor=4

Needs libtpu (`pip install -e ".[tpu]"`). Builds the run's programs on abstract models of the pool's
real shapes (no weights, no hub), shards them on the config's mesh over the topology's devices, compiles
each and writes WORKDIR/compile_report.{json,md}: per-device memory against the chip's HBM, the
compiler's time estimate, decode tokens/s, % of the HBM roofline, training MFU, and any large array
left fully replicated. A program that does not fit is one `error:` line (program, shortfall, mesh) and
exit status 1. Runs on the CPU backend (JAX_PLATFORMS=cpu is set unless given): libtpu only compiles.
"""

from __future__ import annotations

import os
import pathlib
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before jax is imported: the TPU devices are only compiled for
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without install

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/<strategy>.py[:variant] file", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice to compile for: v5e:2x2, v5e:2x4, v5e:4x4, v4:2x2x4, ...")
_WORKDIR = flags.DEFINE_string("workdir", None,
                                "where the reports go (default: workdir/compile/<strategy>-<variant>-<topology>)")
_ROWS = flags.DEFINE_integer("rows", None, "the engine's rows per member of one call (default: config.engine.max_batch)")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 1024, "the longest prompt bucket a strategy round sends")
_ONLY = flags.DEFINE_string("only", "", "compile only the programs whose name contains this")
flags.mark_flags_as_required(["config", "topology"])


def main(argv: list[str]) -> int:
    del argv
    from agora_jax.compile import compile_run

    config = _CONFIG.value
    name = f"{config.strategy.name}-{config.variant}-{_TOPOLOGY.value.replace(':', '_')}"
    workdir = pathlib.Path(_WORKDIR.value or f"workdir/compile/{name}")
    report = compile_run(config, _TOPOLOGY.value, workdir, rows=_ROWS.value, prompt_len=_PROMPT_LEN.value,
                         only=_ONLY.value, progress=lambda line: print(line, flush=True))
    print(report.markdown)
    print(f"wrote {workdir / 'compile_report.md'} and compile_report.json")
    return 0


def run() -> None:
    """absl entry point; a program that does not fit, a bad topology or config: one `error:` line, exit 1."""
    from agora_jax.compile import DoesNotFit, TopologyError
    from agora_jax.evolution.errors import USER_ERRORS

    try:
        app.run(main)
    except (DoesNotFit, TopologyError, *USER_ERRORS) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run()
