"""The exception types the command line catches and prints as one line; importing this module imports nothing
else (no torch), so the CLI can name them before it knows which subcommand runs.

Each is defined here once and re-exported by the module that raises it (`looped.config.ConfigError`,
`looped.checkpoint.CheckpointError`, ...), so both import paths name the same class.
"""

from __future__ import annotations

__all__ = [
    "USER_ERRORS",
    "CheckpointError",
    "ConfigError",
    "ConversionError",
    "DataError",
    "EdgeError",
    "FitError",
    "TrainingError",
]


class ConfigError(ValueError):
    """A config value, key or file that cannot be used; the message names the offending key."""


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read or written; the message names the file or key."""


class DataError(ValueError):
    """Data that cannot be read, prepared or loaded; the message says where and, when it can, what to do."""


class ConversionError(ValueError):
    """A Parcae config or state dict that does not fit a looped model; the message names the key."""


class EdgeError(ValueError):
    """An exported edge model (`looped export onnx`) that cannot be loaded or run as asked."""


class FitError(ValueError):
    """A results file that cannot be fitted as written: the message names file:line and the problem."""


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. it kept diverging after every roll-back); the message says why."""


# What `looped` reports as "looped COMMAND: error: MESSAGE" (exit status 2) instead of a traceback: the
# types above and ValueError, which library functions raise for a bad argument.
USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    CheckpointError,
    DataError,
    ConversionError,
    EdgeError,
    FitError,
    TrainingError,
    ValueError,
)
