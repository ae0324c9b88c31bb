"""What a reply parses into, whatever the model's format: the OpenAI assistant message (reasoning_content, content,
tool_calls), and the events a stream of it yields."""
import json
from dataclasses import dataclass, field

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
UNKNOWN_NAME = "unknown"  # the name of a call that names no function (and that no offered tool takes)


@dataclass
class ToolCall:
    id: str  # what a tool result answers it by
    name: str
    arguments: str  # a JSON object's text; as the model wrote it where the call is malformed
    error: str | None = None  # why the call is not well formed; the call is kept anyway

    def to_message(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class Reply:
    reasoning_content: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    def to_message(self) -> dict:
        """The assistant message for the history (templates decide whether past reasoning is shown again)."""
        message = {"role": "assistant", "content": self.content}
        if self.reasoning_content:
            message["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            message["tool_calls"] = [call.to_message() for call in self.tool_calls]
        return message


@dataclass
class Event:
    kind: str  # "reasoning" or "content" (text is a delta), or "tool_call" (a finished call)
    text: str = ""
    tool_call: ToolCall | None = None


def read_json(text: str) -> tuple[object, str | None]:
    """The JSON value `text` holds, or None and why it holds none."""
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg} at character {e.pos})"
    except RecursionError:
        return None, "nested too deeply to read"
