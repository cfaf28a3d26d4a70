"""Errors that come from the user's input (config, data, checkpoints, workdir), not from a bug:
`launch/main.py` reports them as one line and exits with status 1."""

from agora_jax.evolution.config import ConfigError
from agora_jax.evolution.store import IncompatibleWorkdirError
from agora_jax.models import CheckpointError, UnsupportedModelError
from agora_jax.tasks import SplitOverlapError, TaskDataError

USER_ERRORS = (ConfigError, CheckpointError, UnsupportedModelError, TaskDataError, SplitOverlapError, IncompatibleWorkdirError,
               OSError)
