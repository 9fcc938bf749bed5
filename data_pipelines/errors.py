"""The one error type of the data tools.

It is not `nopetrain.config.ConfigError`: that one names a key of the training config, this one names an input file
(and line), a shard or a command-line flag. Both are ValueErrors with one-line messages that end a run with exit 2.
"""

from nopetrain.exits import ExitError, one_line

__all__ = ["DataError", "one_line"]


class DataError(ExitError, ValueError):
    """Input data or a flag that cannot work; the one-line message names the file (and line), the shard or the flag."""
