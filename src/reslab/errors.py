"""The one exception for mistakes a user can make: the CLI prints its message and exits 2."""


class ReslabError(Exception):
    """Bad input from the user: a config key, a file, a model name. The message says what and how to fix it."""

    exit_code = 2
