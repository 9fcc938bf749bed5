"""The one error type of the data tools.

It is not `nopetrain.config.ConfigError`: that one names a key of the training config, this one names an input file
(and line) or a command-line flag. Both are ValueErrors with one-line messages.
"""


class DataError(ValueError):
    """Input data or a flag that cannot work; the one-line message names the file (and line) or the flag."""


def one_line(message: object) -> str:
    """Collapses a message from a library (sentencepiece, pyarrow) onto one line."""
    return " ".join(str(message).split())
