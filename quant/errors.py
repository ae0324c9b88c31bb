class K2Error(Exception):
    """The toolkit's one error type: an error the user can act on, its message one line that the CLI prints before
    exiting non-zero. Defined in the bottom layer so that quant/ raises it too."""
