"""The error every layer raises for a setting that cannot work. It lives below every package so that
strategies, distillation and the loop raise one type without importing upward (tests/test_layers.py)."""


class ConfigError(ValueError):
    """A config value that cannot work (unknown task, strategy, pool kind, ...); the message names the key."""
