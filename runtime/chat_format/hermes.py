"""The Hermes reply format of Qwen3 (and of Llama-family chat models served with ChatML templates): tool calls as JSON
objects in `<tool_call>` blocks, as many as the model writes, with text before, between and after them.

    <think>
    reasoning
    </think>

    answer
    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

K2's state machine parses it (runtime/chat_format/kimi_k2.py), with K2's guarantees: a stream gives what the finished
reply gives however it is cut, a call's body is held until `</tool_call>` however long, and a call made inside an
unclosed think block is still a call. What differs:
- Whitespace (line breaks, spaces) at the start of the reasoning and of the content, and before a marker or the
  reply's end, is layout: the template writes it around its markers (`<think>\n...\n</think>\n\n`, each call on its
  own line) and writes it again from the message, so the message holds the text alone, as transformers' Qwen3
  response parser takes it. Content after a call keeps the line break that parts it from the content before. A
  stream holds trailing whitespace back until text follows it.
- The reply starts in reasoning only where it writes `<think>` or the prompt ends with one (Qwen3-Thinking-2507's
  template opens it): Qwen3 always writes `<think>` when it thinks, and a prompt whose think block the template closed
  (`enable_thinking=False`), or a model that never thinks (Qwen3-2507-Instruct), replies with content.
- The model writes no call ids: a call's id is `call_N`, N its index among the reply's calls. Ids that follow from the
  text keep a stream's parse equal to the finished one; they need to be unique only within the message whose results
  answer them, and Qwen3's template pairs results with calls by position, not id.
- A call is `{"name": NAME, "arguments": {...}}`; its arguments are the JSON text of that object, as the model wrote
  it. A body that is not such an object (not JSON, no name, arguments that are not an object) is kept as a call
  flagged with the problem, its arguments the body as written; a call without `</tool_call>`, or with a name that no
  offered tool has, is kept and flagged too.
"""
import json
import re

from runtime.chat_format.kimi_k2 import CONTENT, REASONING, ReplyParser, held_back
from runtime.chat_format.reply import THINK_CLOSE, UNKNOWN_NAME, Event, ToolCall, read_json
from runtime.tools import NAME_PATTERN

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL = CONTENT + 1
_NAME_IN_BROKEN_JSON = re.compile(r'"name"\s*:\s*"([^"\\]*)"')
_TEMPLATE_LAYOUT = re.compile(r'\{\s*"name"\s*:\s*"(?:[^"\\]|\\.)*"\s*,\s*"arguments"\s*:\s*(?P<arguments>.*)\}',
                              re.DOTALL)  # {"name": "NAME", "arguments": ARGUMENTS}


class Qwen3Parser(ReplyParser):
    implicit_reasoning = False
    exits = {
        REASONING: {THINK_CLOSE: CONTENT, CALL_OPEN: _CALL},
        CONTENT: {CALL_OPEN: _CALL},
        _CALL: {CALL_CLOSE: CONTENT, CALL_OPEN: _CALL},  # a missing end still ends a call where the next one begins
    }
    held = ()

    @classmethod
    def canonical_history(cls, messages: list[dict]) -> list[dict]:
        """The template renders no call ids (results follow their calls in order): the history is read as it is."""
        return messages

    @classmethod
    def forced_call(cls, name: str | None, index: int) -> str:
        """The start of a reply that can only go on as a call, laid out as the template writes one."""
        return f'{CALL_OPEN}\n{{"name": "' + ("" if name is None else f'{name}", "arguments": ')

    def _held_back(self, text: str, markers) -> int:
        marker = held_back(text, markers)
        before = text[:len(text) - marker]
        return len(text) - len(before.rstrip())

    def _text(self, state: int, text: str, events: list[Event]):
        started = self.reply.reasoning_content if state == REASONING else self.reply.content
        super()._text(state, text if started else text.lstrip(), events)

    def _leave(self, text: str, next_state: int, events: list[Event]):
        if self.state == _CALL:
            self._call(self._tool_call(text, None if next_state == CONTENT else f"the tool call has no {CALL_CLOSE}"),
                       events)
        else:
            self._text(self.state, text.rstrip(), events)

    def _end(self, events: list[Event]):
        text, self.buffer = self.buffer, ""
        if self.state == _CALL:
            self._call(self._tool_call(text, "the reply ended inside this tool call"), events)
        else:
            self._text(REASONING if self.state == REASONING else CONTENT, text.rstrip(), events)

    def _tool_call(self, body: str, problem: str | None) -> ToolCall:
        """The call a `<tool_call>` body holds; `problem`: what is wrong with its markers, if anything."""
        call_id, body = f"call_{len(self.reply.tool_calls)}", body.strip()
        value, unreadable = read_json(body)
        named = isinstance(value, dict) and isinstance(value.get("name"), str)
        if named and isinstance(value.get("arguments"), dict):
            name, arguments = value["name"], value["arguments"]
            if not re.fullmatch(NAME_PATTERN, name):
                problem = problem or f"{name!r} is not a function name"
            elif self.tools and name not in {tool.function.name for tool in self.tools}:
                problem = problem or f"{name!r} names no offered tool"
            # The arguments as written where the body is laid out as the template writes it (a history rendered
            # again then repeats the reply byte for byte), else as JSON writes them.
            laid_out = _TEMPLATE_LAYOUT.fullmatch(body)
            written = laid_out["arguments"].rstrip() if laid_out else ""
            if not laid_out or read_json(written)[0] != arguments:
                written = json.dumps(arguments, ensure_ascii=False)
            return ToolCall(call_id, name, written, problem)
        if unreadable:
            why = f"the tool call is {unreadable}"
        elif not named:
            why = 'the tool call is not a JSON object with a "name" string'
        else:
            why = 'the tool call\'s "arguments" are not a JSON object'
        # The name a broken body still shows: a reply cut inside a call's arguments has one.
        if named:
            name = value["name"]
        else:
            found = _NAME_IN_BROKEN_JSON.search(body) if value is None else None
            name = found[1] if found else UNKNOWN_NAME
        return ToolCall(call_id, name, body, problem or why)


class LlamaParser(Qwen3Parser):
    """The same calls without reasoning: a `<think>` these models write is text."""
    reasoning = False
