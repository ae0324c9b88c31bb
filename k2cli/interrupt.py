"""Ctrl-C in a long job: say what was kept and how to go on, instead of a bare exit."""
from contextlib import contextmanager


class Interrupted(Exception):
    """The job stopped at the user's Ctrl-C; the message says what was kept and how to resume."""


@contextmanager
def resumable(kept: str):
    """Around a job that can be resumed: Ctrl-C inside becomes Interrupted(kept)."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(kept) from None
