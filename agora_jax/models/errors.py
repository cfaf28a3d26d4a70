"""Errors raised while reading model configs and checkpoints."""


class CheckpointError(ValueError):
    """A checkpoint cannot be read: the message names the file and the tensor or field."""


class UnsupportedModelError(ValueError):
    """A config describes an architecture or option agora_jax does not implement."""
