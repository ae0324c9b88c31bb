"""A refused request: its HTTP status, the message, and the field at fault, which each API writes in its own error
shape (OpenAI's `{"error": {"message", "type", "param", "code"}}`, Anthropic's `{"type": "error", "error": {...}}`)."""
import reprlib

from pydantic import ValidationError

from runtime.config_schema import JSON_PROBLEMS
from runtime.errors import K2Error

_PROBLEMS = JSON_PROBLEMS | {"int_type": "should be an integer", "float_type": "should be a number",
                             "bool_type": "should be true or false", "extra_forbidden": "is not a field of this object"}
# Pydantic's names for the branches of a union that are not models (`str | list[dict]`: `str`, `list[dict[any,any]]`);
# a model branch goes by its class's name. JSON's field names are none of these.
_BRANCH_TYPES = {"str", "int", "float", "bool", "none"}


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
        elif isinstance(part, str) and part.isidentifier() and part not in _BRANCH_TYPES and not part[0].isupper():
            path += f".{part}" if path else part
    return path


def validation_error(e: ValidationError) -> RequestError:
    """The field at fault, in one line naming it and what it should be. Of a union's branches, the one pydantic went
    deepest into names the field (`tool_choice.function.name`, not `tool_choice`); where several fail at the same
    field, each is named (`should be a string or a JSON list`)."""
    errors = e.errors()
    where = field_path(max(errors, key=lambda error: len(error["loc"]))["loc"]) or "the request body"
    here = [error for error in errors if (field_path(error["loc"]) or "the request body") == where]
    problems = list(dict.fromkeys(_PROBLEMS.get(error["type"], "{msg}").format(
        msg=error["msg"].replace("Input should", "should", 1)) for error in here))
    problem = " or ".join([problems[0], *(p.removeprefix("should be ") for p in problems[1:])])
    if any(error["type"] == "literal_error" for error in here):
        problem += f", not {reprlib.repr(here[0].get('input'))}"
    return RequestError(f"{where}: {problem}", where)
