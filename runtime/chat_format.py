"""Kimi K2's reply format, parsed into the OpenAI message shape: reasoning_content, content and tool_calls.

    <think>reasoning</think>answer
    <|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{json}<|tool_call_end|>...
    <|tool_calls_section_end|>

Reasoning ends at `</think>` or, implicitly, where the tool-call section begins: a call made inside an unclosed think
block is still a call. Arguments that are not a JSON object are kept as written and flagged, never dropped. The same
state machine parses a finished reply and a stream, so both give the same result however the text is cut.
"""
import json
import re
from dataclasses import dataclass, field

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
SECTION_BEGIN, SECTION_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CALL_BEGIN, ARGUMENTS_BEGIN, CALL_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
_CALL_ID_FORMAT = re.compile(r"functions\.(?P<name>.+):(?P<index>\d+)")


@dataclass
class ToolCall:
    id: str  # functions.NAME:IDX, as the model wrote it
    arguments: str  # the raw text between the argument marker and the end marker
    error: str | None = None  # why the call is not well formed; the call is kept anyway

    @property
    def name(self) -> str:
        return self.id.split(":")[0].split(".")[-1]

    @classmethod
    def parse(cls, call_id: str, arguments: str, unfinished: str | None = None) -> "ToolCall":
        """`unfinished`: why the call lacks its end marker, if it does."""
        call_id = call_id.strip()
        if unfinished:
            return cls(call_id, arguments, unfinished)
        if not _CALL_ID_FORMAT.fullmatch(call_id):
            return cls(call_id, arguments, f"tool call id {call_id!r} is not functions.NAME:INDEX")
        try:
            parsed = json.loads(arguments)
        except json.JSONDecodeError as e:
            return cls(call_id, arguments, f"arguments are not valid JSON ({e.msg} at character {e.pos})")
        return cls(call_id, arguments, None if isinstance(parsed, dict) else "arguments are not a JSON object")

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


# Per state: the markers that end it and the state each leads to.
_START, _REASONING, _CONTENT, _SECTION, _CALL_ID, _ARGUMENTS = range(6)
_EXITS = {
    _REASONING: {THINK_CLOSE: _CONTENT, SECTION_BEGIN: _SECTION},
    _CONTENT: {SECTION_BEGIN: _SECTION},
    _SECTION: {CALL_BEGIN: _CALL_ID, SECTION_END: _CONTENT},
    _CALL_ID: {ARGUMENTS_BEGIN: _ARGUMENTS, CALL_END: _SECTION},
    # A missing end marker still ends the call where the next call or the section's end begins.
    _ARGUMENTS: {CALL_END: _SECTION, CALL_BEGIN: _CALL_ID, SECTION_END: _CONTENT},
}


def _held_back(text: str, markers) -> int:
    """Length of the longest end of `text` that could be the start of a marker: it waits for the next chunk."""
    for n in range(min(len(text), max(map(len, markers)) - 1), 0, -1):
        if any(m.startswith(text[-n:]) for m in markers):
            return n
    return 0


class ReplyParser:
    def __init__(self, in_reasoning: bool = False):
        """`in_reasoning`: the prompt already opened the think block (its generation prompt ends with `<think>`)."""
        self.state = _REASONING if in_reasoning else _START
        self.buffer = ""
        self.call_id = ""
        self.reply = Reply()

    def feed(self, text: str) -> list[Event]:
        self.buffer += text
        events = []
        while self.buffer:
            if self.state == _START:
                if self.buffer.startswith(THINK_OPEN):
                    self.buffer, self.state = self.buffer[len(THINK_OPEN):], _REASONING
                elif THINK_OPEN.startswith(self.buffer):
                    break
                else:
                    self.state = _CONTENT
                continue
            exits = _EXITS[self.state]
            found = [(self.buffer.find(m), m) for m in exits if m in self.buffer]
            if not found:
                if self.state in (_REASONING, _CONTENT):
                    keep = _held_back(self.buffer, exits)
                    self._text(self.buffer[:len(self.buffer) - keep], events)
                    self.buffer = self.buffer[len(self.buffer) - keep:]
                break
            at, marker = min(found)
            self._leave(self.buffer[:at], exits[marker], events)
            self.buffer = self.buffer[at + len(marker):]
        return events

    def finish(self) -> list[Event]:
        """The end of the reply: text still held back is flushed, an unfinished tool call is kept and flagged."""
        events = []
        if self.state in (_START, _CONTENT, _REASONING):
            if self.state == _START:
                self.state = _CONTENT
            self._text(self.buffer, events)
        elif self.state in (_CALL_ID, _ARGUMENTS):
            call_id, arguments = (self.buffer, "") if self.state == _CALL_ID else (self.call_id, self.buffer)
            self._call(ToolCall.parse(call_id, arguments, "the reply ended inside this tool call"), events)
        self.buffer = ""
        self.state = _CONTENT
        return events

    def _text(self, text: str, events: list[Event]):
        if not text:
            return
        if self.state == _REASONING:
            self.reply.reasoning_content += text
            events.append(Event("reasoning", text))
        else:
            self.reply.content += text
            events.append(Event("content", text))

    def _call(self, call: ToolCall, events: list[Event]):
        self.reply.tool_calls.append(call)
        events.append(Event("tool_call", tool_call=call))

    def _leave(self, text: str, next_state: int, events: list[Event]):
        """Text before the marker that ends the current state belongs to that state."""
        if self.state in (_REASONING, _CONTENT):
            self._text(text, events)
        elif self.state == _CALL_ID:
            self.call_id = text
            if next_state == _SECTION:  # a call with no argument marker at all
                self._call(ToolCall(text.strip(), "", "the tool call has no arguments"), events)
        elif self.state == _ARGUMENTS:
            unfinished = None if next_state == _SECTION else f"the tool call has no {CALL_END}"
            self._call(ToolCall.parse(self.call_id, text, unfinished), events)
        self.state = next_state


def parse_reply(text: str, in_reasoning: bool = False) -> Reply:
    parser = ReplyParser(in_reasoning)
    parser.feed(text)
    parser.finish()
    return parser.reply


# Reply formats by the name a model family gives (runtime/models/family.py `reply_format`).
REPLY_PARSERS = {"kimi_k2": ReplyParser}
