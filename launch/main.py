"""Run the single-multi evolution loop (or AGORA) from an ml-collections config.

    python launch/main.py --config=configs/debate.py                 # tiny models, CPU minutes
    python launch/main.py --config=configs/debate.py:smollm2 --config.rounds=1 --workdir=runs/smol
    python launch/main.py --config=configs/agora.py:qwen2.5-7b --workdir=gs://bucket/run   # TPU / GPU
    python launch/main.py --config=configs/debate.py:smollm2 --config.pool.models=smollm2-135m-instruct,/m/a.gguf

Every key of the config is settable as --config.<key>=<value>; a tuple key (pool.models, distill.buckets,
a strategy's member indices or weights) takes comma-separated items (`a,b,c`, `64,128`: each item a Python
literal, else a string), a Python tuple (`"('a', 'b')"`), or one item per repeated flag. Every setting is
checked before any work (`agora_jax.evolution.validate`); a bad one is one `error:` line and exit status 1.
Re-running the same command after an interruption resumes from the last completed unit.
"""

from __future__ import annotations

import ast
import logging
import os
import pathlib
import sys
from typing import Any

from absl import app, flags
from ml_collections import config_flags
from ml_collections.config_flags import tuple_parser

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without install

from agora_jax.evolution.config import ConfigError  # noqa: E402  (after the path insert)


class _TupleParser(tuple_parser.TupleParser):
    """ml-collections' tuple overrides, plus comma-separated items (`a,b,c`) and the empty tuple (``)."""

    def parse(self, argument: Any) -> tuple:
        if isinstance(argument, str) and not argument.strip():
            return ()
        if isinstance(argument, str) and "," in argument and argument.lstrip()[:1] not in "([":
            return tuple(_literal(item.strip()) for item in argument.split(","))
        return super().parse(argument)


def _literal(text: str) -> Any:
    """`48` -> 48, `'a'` -> 'a'; anything else (a name, a path) is the string itself."""
    try:
        return ast.literal_eval(text)
    except (SyntaxError, ValueError):
        return text


config_flags.register_flag_parser_for_type(tuple, _TupleParser())
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
    from agora_jax.evolution.validate import validate

    config = _CONFIG.value
    validate(config)  # before the workdir is made: a bad setting leaves nothing behind
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


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, where a bad --config (file, variant, key or value) raises one ConfigError
    naming it instead of a traceback."""
    try:
        rest = flags.FLAGS(argv)
        _CONFIG.value.get("strategy")  # a config file that failed to load raises here
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
        raise ConfigError(_flag_error(e, argv)) from None
    return rest


def _flag_error(error: BaseException, argv: list[str]) -> str:
    """One line naming the flag and what is wrong with it."""
    root = error
    while (root.__cause__ or root.__context__) is not None:
        root = root.__cause__ or root.__context__
    config_flag = next((a for a in argv if a.startswith("--config=")), "--config")
    if isinstance(root, KeyError):  # ml-collections' report of an unknown key: KeyError("'name'")
        name = str(root.args[0]).strip("'\"")
        for arg in argv:
            key = arg.split("=", 1)[0]
            if key.startswith("--config.") and name in key.split("."):
                return f"{key}: no such key in {config_flag.split('=', 1)[-1]}"
    if root is not error and (isinstance(root, (OSError, ConfigError)) or "parsing config file" in str(error)):
        lines = [line.strip() for line in str(root).splitlines() if line.strip()]
        return f"{config_flag}: {lines[-1]}"  # the config file's own error, not absl's wrapping of it
    return str(error).splitlines()[0]


def run() -> None:
    """absl entry point; expected failures become one clear line and exit status 1."""
    from agora_jax.evolution.errors import USER_ERRORS

    try:
        app.run(main, flags_parser=_parse_flags)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run()
