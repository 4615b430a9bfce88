"""The one exception for mistakes a user can make: the CLI prints its message and exits 2."""


def is_count(value: object) -> bool:
    """An integer >= 1 and not a bool: what every width, stride, channel and batch count given by a user must be."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


class ReslabError(Exception):
    """Bad input from the user: a config key, a file, a model name. The message says what and how to fix it."""

    exit_code = 2
