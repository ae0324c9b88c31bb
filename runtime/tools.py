"""The tools a chat offers the model, in OpenAI's shape: `k2 chat --tools FILE` reads them, the OpenAI-compatible
server receives them in a request, and both check them here, once, where they come in.

    [{"type": "function", "function": {"name": "get_weather", "description": "...", "parameters": {JSON schema}}}]

Unknown keys are allowed, as OpenAI's API allows them; the list reaches the chat template as it was written. A wrong
list fails with one line naming the entry and the field (`tools[1].function.name: ...`).
"""
import reprlib
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, StringConstraints, TypeAdapter, ValidationError

from runtime.config_schema import JSON_PROBLEMS
from runtime.errors import K2Error

NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for a function name


class _Schema(BaseModel):
    # Strict: `"name": 3` or `"required": "city"` is a mistake to report, not a value to convert.
    model_config = ConfigDict(extra="allow", strict=True)


class Parameters(_Schema):
    """The JSON schema of a call's arguments, which are always a JSON object."""
    type: Literal["object"] = "object"
    properties: dict[str, dict] = {}
    required: list[str] = []

    def accepts(self, arguments: dict) -> bool:
        """Whether `arguments` has every key the schema requires and no key it does not name (keys only: enough to
        tell which offered tool a call that names none was meant for)."""
        return set(self.required) <= arguments.keys() <= self.properties.keys()


class Function(_Schema):
    name: Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
    description: str | None = None
    parameters: Parameters = Parameters()  # omitted: a function without arguments


class Tool(_Schema):
    type: Literal["function"]
    function: Function


_TOOL_LIST = TypeAdapter(list[Tool])


_PROBLEMS = JSON_PROBLEMS | {
    "string_pattern_mismatch": "{input} is not a function name (1 to 64 letters, digits, _ or -)",
    "literal_error": "{msg}, not {input}"}


def _one_line(error: dict) -> str:
    """`tools[1].function.name: problem`; keys and values written by repr (shortened), so the line stays one line."""
    where = "tools" + "".join(f".{part}" if str(part).isidentifier() else f"[{reprlib.repr(part)}]"
                              for part in error["loc"])
    problem = _PROBLEMS.get(error["type"], "{msg}").format(msg=error["msg"].replace("Input should", "should", 1),
                                                          input=reprlib.repr(error.get("input")))
    return f"{where}: {problem}"


def check_tools(data) -> list[Tool]:
    """The tool list `data` (parsed JSON) as models, or a K2Error naming the first wrong entry and field."""
    try:
        tools = _TOOL_LIST.validate_python(data)
    except ValidationError as e:
        raise K2Error(_one_line(e.errors()[0])) from None
    first = {}
    for i, tool in enumerate(tools):
        name = tool.function.name
        if name in first:
            raise K2Error(f"tools[{i}].function.name: {name!r} is already the name of tools[{first[name]}]")
        first[name] = i
    return tools
