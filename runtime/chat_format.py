"""Kimi K2's reply format, parsed into the OpenAI message shape: reasoning_content, content and tool_calls.

    <think>reasoning</think>answer
    <|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{json}<|tool_call_end|>...
    <|tool_calls_section_end|>

Reasoning ends at `</think>` or, implicitly, where the tool-call section begins: a call made inside an unclosed think
block is still a call. A thinking model's reply may start inside the think block without writing `<think>` (the
prompt opened it, or the model left it out, as K2-Thinking does at times): the caller says so (`in_reasoning`), and
the text before its `</think>` is reasoning, streamed as it comes, as vLLM's kimi_k2 reasoning parser takes it; a
`<think>` the model writes anyway is dropped. Nothing the model wrote is dropped: a call with arguments that are not a JSON object, an id that
names no function, or no end is kept and flagged; text in a tool-call section outside any call is content.

The same state machine parses a finished reply and a stream, so both give the same result however the text is cut.
A stream holds text back only while it cannot tell where the text belongs:
- the end of a text that could be the start of a marker, until the next chunk tells;
- text in a tool-call section outside a call's arguments, until the next marker; a section whose next marker does
  not begin within HOLD_LIMIT characters is given up on and its text is content, as vLLM gives up on a section;
- a call's arguments, until the call ends, however long: they are the call (vLLM dropped its cap on them, which cut
  long file writes: vllm-project/vllm#34442).
"""
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from runtime.tools import NAME_PATTERN, Tool, check_tools

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
SECTION_BEGIN, SECTION_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CALL_BEGIN, ARGUMENTS_BEGIN, CALL_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
HOLD_LIMIT = 8192  # characters; vLLM's limit on an unclosed tool section
_CALL_ID_FORMAT = re.compile(r"functions\.(?P<name>.+):(?P<index>\d+)")
UNKNOWN_NAME = "unknown"  # the name of a call whose id names no function and that matches no offered tool


def _name_guesses(call_id: str) -> list[str]:
    """The function names a malformed id may hold, most literal first: the id without a `functions.` prefix, then
    also without a trailing index (`functions.get_weather`, `get_weather:0`, `functions.get_weather.0`)."""
    rest = re.sub(r"^functions[._]?", "", call_id)
    bare = re.sub(r"[:._]?\d+$", "", rest)
    return [g for g in dict.fromkeys((rest, bare)) if re.fullmatch(NAME_PATTERN, g) and not g.isdigit()]


def _json_object(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _resolve_name(call_id: str, arguments: str, tools: Sequence[Tool]) -> tuple[str, str | None]:
    """The function a call is for, and why its id is not well formed (None if it is, or if the offered tools tell).
    A malformed id is resolved against the request's tools as SGLang's K2 parser does: an offered tool the id names
    (`functions.get_weather` without its index, `get_weather:0`); for an id that names no function (a bare counter
    `0`, a client's `call_3`), the one offered tool whose schema takes the arguments. An id that names a function
    not offered (`functions.invalid.0`) keeps that name and is flagged: the arguments do not overrule what it says."""
    if _CALL_ID_FORMAT.fullmatch(call_id):
        return call_id.split(":")[0].split(".")[-1], None  # K2's own rule (its tool-call guidance)
    guesses = _name_guesses(call_id)
    offered = {tool.function.name: tool.function for tool in tools}
    named = [g for g in guesses if g in offered]
    if named:
        return named[0], None
    problem = f"tool call id {call_id!r} is not functions.NAME:INDEX"
    if call_id.startswith("functions"):
        return (guesses[0] if guesses else UNKNOWN_NAME), problem + (", and names no offered tool" if tools else "")
    values = _json_object(arguments)
    taking = [name for name, function in offered.items() if values is not None and function.parameters.accepts(values)]
    if len(taking) == 1:
        return taking[0], None
    if tools:
        fit = f"{len(taking)} of the offered tools ({', '.join(taking)})" if taking else "none of the offered tools"
        problem += f", and its arguments fit {fit}"
    return (guesses[0] if guesses else UNKNOWN_NAME), problem


@dataclass
class ToolCall:
    id: str  # as the model wrote it: a tool result answers it by this id
    name: str
    arguments: str  # the raw text between the argument marker and the end marker
    error: str | None = None  # why the call is not well formed; the call is kept anyway

    @classmethod
    def parse(cls, call_id: str, arguments: str, tools: Sequence[Tool] = (), problem: str | None = None) -> "ToolCall":
        """`problem`: what is wrong with the call's structure (no end marker, no arguments), if anything."""
        call_id = call_id.strip()
        name, id_problem = _resolve_name(call_id, arguments, tools)
        if problem is None and id_problem is None:
            try:
                parsed = json.loads(arguments)
            except json.JSONDecodeError as e:
                problem = f"arguments are not valid JSON ({e.msg} at character {e.pos})"
            except RecursionError:
                problem = "arguments are nested too deeply to read"
            else:
                problem = None if isinstance(parsed, dict) else "arguments are not a JSON object"
        return cls(call_id, name, arguments, problem or id_problem)

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
_HELD = (_SECTION, _CALL_ID)  # states whose text waits, up to HOLD_LIMIT, for the marker that ends them


def _held_back(text: str, markers) -> int:
    """Length of the longest end of `text` that could be the start of a marker: it waits for the next chunk."""
    for n in range(min(len(text), max(map(len, markers)) - 1), 0, -1):
        if any(m.startswith(text[-n:]) for m in markers):
            return n
    return 0


class ReplyParser:
    def __init__(self, in_reasoning: bool = False, tools: list[dict] | None = None):
        """`in_reasoning`: the reply starts inside a think block: the prompt opened it (its generation prompt ends
        with `<think>`), or the model thinks first and may not write `<think>` (K2-Thinking).
        `tools`: the request's tool list (OpenAI shape), which names the function of a call whose id does not."""
        self.state = _START
        self.in_reasoning = in_reasoning
        self.tools = check_tools(tools) if tools else []
        self.buffer = ""
        self.searched = 0  # where in the buffer a marker could still begin: the search resumes there
        self.call_id = ""
        self.reply = Reply()

    def feed(self, text: str) -> list[Event]:
        self.buffer += text
        return self._run(final=False)

    def finish(self) -> list[Event]:
        """The end of the reply: text still held back is flushed, an unfinished tool call is kept and flagged."""
        events = self._run(final=True)
        self.state = _CONTENT
        return events

    def _run(self, final: bool) -> list[Event]:
        events = []
        while self.buffer:
            if self.state == _START:
                # <think> opens the reasoning; after a prompt that opened it already, the model's own is dropped too.
                if self.buffer.startswith(THINK_OPEN):
                    self._go(_REASONING, self.buffer[len(THINK_OPEN):])
                    continue
                if THINK_OPEN.startswith(self.buffer) and not final:
                    break
                self._go(_REASONING if self.in_reasoning else _CONTENT)
                continue
            exits = _EXITS[self.state]
            found = [(at, m) for m in exits if (at := self.buffer.find(m, self.searched)) >= 0]
            longest = max(map(len, exits))
            # No marker begins within HOLD_LIMIT characters: one found later, or none where any would be complete.
            if self.state in _HELD and (min(found)[0] > HOLD_LIMIT if found else len(self.buffer) > HOLD_LIMIT and (
                    final or len(self.buffer) >= HOLD_LIMIT + longest)):
                self._go(_CONTENT, self.buffer)  # the text is content
                continue
            if not found:
                if final:
                    break
                self.searched = max(0, len(self.buffer) - longest + 1)
                if self.state in (_REASONING, _CONTENT):
                    keep = _held_back(self.buffer, exits)
                    self._text(self.state, self.buffer[:len(self.buffer) - keep], events)
                    self._go(self.state, self.buffer[len(self.buffer) - keep:])
                break
            at, marker = min(found)
            self._leave(self.buffer[:at], exits[marker], events)
            self._go(exits[marker], self.buffer[at + len(marker):])
        if final:
            self._end(events)
        return events

    def _go(self, state: int, buffer: str | None = None):
        """Enter `state` with `buffer` left to parse (unchanged if None), searching it from its start."""
        self.state, self.searched = state, 0
        if buffer is not None:
            self.buffer = buffer

    def _end(self, events: list[Event]):
        """The reply ended in the current state, with the buffer's text still unparsed."""
        text, self.buffer = self.buffer, ""
        if self.state == _CALL_ID:
            self._call(ToolCall.parse(text, "", self.tools, "the reply ended inside this tool call"), events)
        elif self.state == _ARGUMENTS:
            self._call(ToolCall.parse(self.call_id, text, self.tools, "the reply ended inside this tool call"), events)
        elif self.state == _REASONING:
            self._text(_REASONING, text, events)
        elif self.state != _SECTION or text.strip():  # whitespace between a section's markers is layout
            self._text(_CONTENT, text, events)

    def _text(self, state: int, text: str, events: list[Event]):
        if not text:
            return
        if state == _REASONING:
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
            self._text(self.state, text, events)
        elif self.state == _SECTION:
            if text.strip():  # text between calls, not a call: content, never dropped
                self._text(_CONTENT, text, events)
        elif self.state == _CALL_ID:
            self.call_id = text
            if next_state == _SECTION:  # a call with no argument marker at all
                self._call(ToolCall.parse(text, "", self.tools, "the tool call has no arguments"), events)
        elif self.state == _ARGUMENTS:
            unfinished = None if next_state == _SECTION else f"the tool call has no {CALL_END}"
            self._call(ToolCall.parse(self.call_id, text, self.tools, unfinished), events)


def parse_reply(text: str, **options) -> Reply:
    """A finished reply; `options` as ReplyParser takes them."""
    parser = ReplyParser(**options)
    parser.feed(text)
    parser.finish()
    return parser.reply


# Reply formats by the name a model family gives (runtime/models/family.py `reply_format`).
REPLY_PARSERS = {"kimi_k2": ReplyParser}
