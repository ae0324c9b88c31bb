class K2Error(Exception):
    """An error the user can act on: the CLI prints its message as one line and exits non-zero."""
