"""A refused request: its HTTP status, the message, and the field at fault, which each API writes in its own error
shape (OpenAI's `{"error": {"message", "type", "param", "code"}}`, Anthropic's `{"type": "error", "error": {...}}`)."""
import reprlib

from pydantic import ValidationError

from runtime.errors import K2Error

# Pydantic's wording, in JSON's terms where it speaks Python's.
_PROBLEMS = {"model_type": "should be a JSON object", "dict_type": "should be a JSON object",
             "list_type": "should be a JSON list", "string_type": "should be a string", "missing": "is missing",
             "int_type": "should be an integer", "float_type": "should be a number", "bool_type": "should be true "
             "or false", "extra_forbidden": "is not a field of this object", "literal_error": "{msg}, not {input}"}


class RequestError(K2Error):
    """A request the server refuses: `status` 400 unless said, `param` the field at fault where one is."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


def field_path(loc) -> str:
    """`messages[2].content` from pydantic's location tuple (union branch names, which are types, left out)."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif isinstance(part, str) and (part.isidentifier() and not any(c in part for c in "[](")):
            path += f".{part}" if path else part
    return path


def validation_error(e: ValidationError) -> RequestError:
    """The first problem pydantic found, in one line naming the field."""
    error = e.errors()[0]
    where = field_path(error["loc"]) or "the request body"
    problem = _PROBLEMS.get(error["type"], "{msg}").format(msg=error["msg"].replace("Input should", "should", 1),
                                                          input=reprlib.repr(error.get("input")))
    return RequestError(f"{where}: {problem}", where)
