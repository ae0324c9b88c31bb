"""K2Error for runtime/ and the CLI: defined in quant/errors.py, the bottom layer, so that quant/ raises it too."""
from quant.errors import K2Error

__all__ = ["K2Error"]
