"""Run the single-multi evolution loop (or AGORA) from an ml-collections config.

    python launch/main.py --config=configs/debate.py                 # tiny models, CPU minutes
    python launch/main.py --config=configs/debate.py:smollm2 --config.rounds=1 --workdir=runs/smol
    python launch/main.py --config=configs/agora.py:qwen2.5-7b --workdir=gs://bucket/run   # TPU / GPU

Re-running the same command after an interruption resumes from the last completed unit.
"""

from __future__ import annotations

import logging
import os
import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without install

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/<strategy>.py[:variant] file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (default: workdir/<strategy>-<variant>)")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "call jax.distributed.initialize() (TPU pods, multi-node GPU)")
flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> int:
    del argv
    if _MULTIHOST.value or "JAX_COORDINATOR_ADDRESS" in os.environ:
        import jax

        jax.distributed.initialize()
    from agora_jax.evolution.loop import evolve

    config = _CONFIG.value
    workdir = _WORKDIR.value or f"workdir/{config.strategy.name}-{config.variant}"
    root = logging.getLogger()  # absl already prints to stderr; add the run's log file
    root.setLevel(logging.INFO)
    root.addHandler(_file_handler(workdir))
    if flags.FLAGS.verbosity < 1:  # Orbax logs every checkpoint step through absl at INFO: keep its warnings
        logging.getLogger("absl").setLevel(logging.WARNING)
    evolve(config, workdir)
    print(pathlib.Path(workdir, "report.md").read_text())
    return 0


def _file_handler(workdir: str) -> logging.Handler:
    path = pathlib.Path(workdir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path / "log.txt")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        return handler
    except OSError as e:
        raise SystemExit(f"error: --workdir={workdir} is not writable ({e.strerror})") from None


def run() -> None:
    """absl entry point; expected failures become one clear line and exit status 1."""
    from agora_jax.evolution.errors import USER_ERRORS

    try:
        app.run(main)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run()
