"""The one exception for mistakes a user can make: the CLI prints its message and exits 2."""

import re


def is_count(value: object) -> bool:
    """An integer >= 1 and not a bool: what every width, stride, channel and batch count given by a user must be."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def first_line(text: str, limit: int = 160) -> str:
    """An error's first line, for one of ours that reports it: no terminal colours, cut at a sentence's end when
    longer than `limit`."""
    line = re.sub(r"\x1b\[[0-9;]*m", "", text).strip().partition("\n")[0]
    if len(line) <= limit:
        return line
    cut = line[:limit].rpartition(". ")[0]
    return cut + "." if cut else line[:limit] + "..."


class ReslabError(Exception):
    """Bad input from the user: a config key, a file, a model name. The message says what and how to fix it."""

    exit_code = 2
    # under torchrun each rank says it; False: the ranks' messages are one, and rank 0 says it
    every_rank = True
    # under torchrun, seconds to add to the time its error file gives: 1 for a rank that stopped because another
    # did, so that torchrun names the other one its root cause
    after = 0
