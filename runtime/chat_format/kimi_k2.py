"""Kimi K2's reply format, and the state machine every reply format shares (`ReplyParser`: K2's format is its own,
other formats subclass it with their markers, runtime/chat_format/hermes.py).

    <think>reasoning</think>answer
    <|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{json}<|tool_call_end|>...
    <|tool_calls_section_end|>

Reasoning ends at `</think>` or, implicitly, where the tool-call section begins: a call made inside an unclosed think
block is still a call. A thinking model's reply may start inside the think block without writing `<think>` (the
prompt opened it, or the model left it out, as K2-Thinking does at times; `starts_in_reasoning` is the rule): the
caller says so (`in_reasoning`), and the text before its `</think>` is reasoning, streamed as it comes, as vLLM's
kimi_k2 reasoning parser takes it; a `<think>` the model writes anyway is dropped. Nothing the model wrote is dropped:
a call with arguments that are not a JSON object, an id that names no function, or no end is kept and flagged; text
in a tool-call section outside any call is content.

The same state machine parses a finished reply and a stream, so both give the same result however the text is cut.
A stream holds text back only while it cannot tell where the text belongs:
- the end of a text that could be the start of a marker, until the next chunk tells;
- text in a tool-call section outside a call's arguments, until the next marker; a section whose next marker does
  not begin within HOLD_LIMIT characters is given up on and its text is content, as vLLM gives up on a section;
- a call's arguments, until the call ends, however long: they are the call (vLLM dropped its cap on them, which cut
  long file writes: vllm-project/vllm#34442).
"""
import re
from collections.abc import Sequence

from runtime.errors import K2Error
from runtime.chat_format.reply import THINK_CLOSE, THINK_OPEN, UNKNOWN_NAME, Event, Reply, ToolCall, read_json
from runtime.tools import NAME_PATTERN, Tool, check_tools

SECTION_BEGIN, SECTION_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CALL_BEGIN, ARGUMENTS_BEGIN, CALL_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
HOLD_LIMIT = 8192  # characters; vLLM's limit on an unclosed tool section
_CALL_ID_FORMAT = re.compile(r"functions\.(?P<name>.+):(?P<index>\d+)")


def _name_guesses(call_id: str) -> list[str]:
    """The function names a malformed id may hold, most literal first: the id without a `functions.` prefix, then
    also without a trailing index (`functions.get_weather`, `get_weather:0`, `functions.get_weather.0`)."""
    rest = re.sub(r"^functions[._]?", "", call_id)
    bare = re.sub(r"[:._]?\d+$", "", rest)
    return [g for g in dict.fromkeys((rest, bare)) if re.fullmatch(NAME_PATTERN, g) and not g.isdigit()]


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
    values = read_json(arguments)[0]
    values = values if isinstance(values, dict) else None
    taking = [name for name, function in offered.items() if values is not None and function.parameters.accepts(values)]
    if len(taking) == 1:
        return taking[0], None
    if tools:
        fit = f"{len(taking)} of the offered tools ({', '.join(taking)})" if taking else "none of the offered tools"
        problem += f", and its arguments fit {fit}"
    return (guesses[0] if guesses else UNKNOWN_NAME), problem


def k2_tool_call(call_id: str, arguments: str, tools: Sequence[Tool] = (), problem: str | None = None) -> ToolCall:
    """A call as K2 writes it, by the id the model gave (a tool result answers it by that id). `problem`: what is
    wrong with the call's structure (no end marker, no arguments), if anything."""
    call_id = call_id.strip()
    name, id_problem = _resolve_name(call_id, arguments, tools)
    if problem is None and id_problem is None:
        values, unreadable = read_json(arguments)
        if unreadable:
            problem = f"arguments are {unreadable}"
        elif not isinstance(values, dict):
            problem = "arguments are not a JSON object"
    return ToolCall(call_id, name, arguments, problem or id_problem)


# The states every format has; a format adds its own after them.
START, REASONING, CONTENT = range(3)
_SECTION, _CALL_ID, _ARGUMENTS = range(3, 6)


def held_back(text: str, markers) -> int:
    """Length of the longest end of `text` that could be the start of a marker: it waits for the next chunk."""
    for n in range(min(len(text), max(map(len, markers)) - 1), 0, -1):
        if any(m.startswith(text[-n:]) for m in markers):
            return n
    return 0


class ReplyParser:
    """Parses K2's format. A format subclassing it sets the class attributes below and `_leave` and `_end`, which
    say what the text of its own states is."""
    reasoning = True  # the format has a think block (otherwise `<think>` is text like any other)
    # The model may think without writing `<think>` (K2-Thinking leaves it out at times), so a reply starts in
    # reasoning wherever the model thinks and the prompt did not close the think block.
    implicit_reasoning = True
    # Per state: the markers that end it and the state each leads to.
    exits = {
        REASONING: {THINK_CLOSE: CONTENT, SECTION_BEGIN: _SECTION},
        CONTENT: {SECTION_BEGIN: _SECTION},
        _SECTION: {CALL_BEGIN: _CALL_ID, SECTION_END: CONTENT},
        _CALL_ID: {ARGUMENTS_BEGIN: _ARGUMENTS, CALL_END: _SECTION},
        # A missing end marker still ends the call where the next call or the section's end begins.
        _ARGUMENTS: {CALL_END: _SECTION, CALL_BEGIN: _CALL_ID, SECTION_END: CONTENT},
    }
    held = (_SECTION, _CALL_ID)  # states whose text waits, up to HOLD_LIMIT, for the marker that ends them

    def __init__(self, in_reasoning: bool = False, tools: list[dict] | None = None):
        """`in_reasoning`: the reply starts inside a think block (see `starts_in_reasoning`).
        `tools`: the request's tool list (OpenAI shape), which names the function of a call whose id does not."""
        self.state = START
        self.in_reasoning = in_reasoning and self.reasoning
        self.tools = check_tools(tools) if tools else []
        self.buffer = ""
        self.searched = 0  # where in the buffer a marker could still begin: the search resumes there
        self.call_id = ""
        self.reply = Reply()

    @classmethod
    def starts_in_reasoning(cls, prompt_end: str, thinking_model: bool) -> bool:
        """Whether a reply after a prompt ending in `prompt_end` starts inside a think block: the prompt opened one
        (it ends with `<think>`, trailing whitespace aside); or, where the format's models may think without
        writing `<think>` (`implicit_reasoning`), the model thinks (`thinking_model`: its template writes
        `</think>`, a token of its vocabulary) and the prompt did not close the block (a thinking switch off)."""
        end = prompt_end.rstrip()
        if not cls.reasoning:
            return False
        return end.endswith(THINK_OPEN) or (cls.implicit_reasoning and thinking_model and not end.endswith(THINK_CLOSE))

    @classmethod
    def canonical_history(cls, messages: list[dict]) -> list[dict]:
        """The conversation with every tool call id in K2's own form, as K2 wrote them and expects to read them:
        `functions.NAME:IDX`, IDX counting the calls of the whole conversation from 0, and each tool result's
        `tool_call_id` mapped to the id of the call it answers. Clients rewrite ids (`call_abc123`) or restart the
        counter, and K2 derails after a few such turns (KIMI_K2.md section 7); a client that echoes K2's ids gets them
        back unchanged. A tool result without an id answers the first unanswered call of the turn before it; one whose
        id answers no earlier call is refused."""
        out, renamed, unanswered, count = [], {}, [], 0
        for i, message in enumerate(messages):
            message = dict(message)
            if message.get("role") == "assistant" and message.get("tool_calls"):
                calls, unanswered = [], []
                for j, call in enumerate(message["tool_calls"]):
                    name = ((call or {}).get("function") or {}).get("name")
                    if not isinstance(name, str) or not name:
                        raise K2Error(f"messages[{i}].tool_calls[{j}].function.name is missing")
                    new_id = f"functions.{name}:{count}"
                    count += 1
                    if isinstance(call.get("id"), str):
                        renamed[call["id"]] = new_id
                    calls.append({**call, "id": new_id})
                    unanswered.append(new_id)
                message["tool_calls"] = calls
            elif message.get("role") == "tool":
                old = message.get("tool_call_id")
                if old is None:
                    if not unanswered:
                        raise K2Error(f"messages[{i}] is a tool result without a tool_call_id, and no tool call "
                                      "before it is unanswered")
                    new_id = unanswered[0]
                elif old in renamed:
                    new_id = renamed[old]
                else:
                    raise K2Error(f"messages[{i}].tool_call_id: {old!r} answers no tool call before it")
                if new_id in unanswered:
                    unanswered.remove(new_id)
                message["tool_call_id"] = new_id
            out.append(message)
        return out

    @classmethod
    def forced_call(cls, name: str | None, index: int) -> str:
        """The start of a reply that can only go on as a tool call (`tool_choice` required, or a named function):
        the model writes the rest. `index` is the call's number in the conversation."""
        if name is None:
            return f"{SECTION_BEGIN}{CALL_BEGIN}functions."
        return f"{SECTION_BEGIN}{CALL_BEGIN}functions.{name}:{index}{ARGUMENTS_BEGIN}"

    def feed(self, text: str) -> list[Event]:
        self.buffer += text
        return self._run(final=False)

    def finish(self) -> list[Event]:
        """The end of the reply: text still held back is flushed, an unfinished tool call is kept and flagged."""
        events = self._run(final=True)
        self.state = CONTENT
        return events

    def _run(self, final: bool) -> list[Event]:
        events = []
        while self.buffer:
            if self.state == START:
                # <think> opens the reasoning; after a prompt that opened it already, the model's own is dropped too.
                if self.reasoning and self.buffer.startswith(THINK_OPEN):
                    self._go(REASONING, self.buffer[len(THINK_OPEN):])
                    continue
                if self.reasoning and THINK_OPEN.startswith(self.buffer) and not final:
                    break
                self._go(REASONING if self.in_reasoning else CONTENT)
                continue
            exits = self.exits[self.state]
            found = [(at, m) for m in exits if (at := self.buffer.find(m, self.searched)) >= 0]
            longest = max(map(len, exits))
            # No marker begins within HOLD_LIMIT characters: one found later, or none where any would be complete.
            if self.state in self.held and (min(found)[0] > HOLD_LIMIT if found else len(self.buffer) > HOLD_LIMIT and (
                    final or len(self.buffer) >= HOLD_LIMIT + longest)):
                self._go(CONTENT, self.buffer)  # the text is content
                continue
            if not found:
                if final:
                    break
                self.searched = max(0, len(self.buffer) - longest + 1)
                if self.state in (REASONING, CONTENT):
                    keep = self._held_back(self.buffer, exits)
                    self._text(self.state, self.buffer[:len(self.buffer) - keep], events)
                    self._go(self.state, self.buffer[len(self.buffer) - keep:])
                break
            at, marker = min(found)
            self._leave(self.buffer[:at], exits[marker], events)
            self._go(exits[marker], self.buffer[at + len(marker):])
        if final:
            self._end(events)
        return events

    def _held_back(self, text: str, markers) -> int:
        """How much of the end of reasoning or content text waits for the next chunk."""
        return held_back(text, markers)

    def _go(self, state: int, buffer: str | None = None):
        """Enter `state` with `buffer` left to parse (unchanged if None), searching it from its start."""
        self.state, self.searched = state, 0
        if buffer is not None:
            self.buffer = buffer

    def _end(self, events: list[Event]):
        """The reply ended in the current state, with the buffer's text still unparsed."""
        text, self.buffer = self.buffer, ""
        if self.state == _CALL_ID:
            self._call(k2_tool_call(text, "", self.tools, "the reply ended inside this tool call"), events)
        elif self.state == _ARGUMENTS:
            self._call(k2_tool_call(self.call_id, text, self.tools, "the reply ended inside this tool call"), events)
        elif self.state == REASONING:
            self._text(REASONING, text, events)
        elif self.state != _SECTION or text.strip():  # whitespace between a section's markers is layout
            self._text(CONTENT, text, events)

    def _text(self, state: int, text: str, events: list[Event]):
        if not text:
            return
        if state == REASONING:
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
        if self.state in (REASONING, CONTENT):
            self._text(self.state, text, events)
        elif self.state == _SECTION:
            if text.strip():  # text between calls, not a call: content, never dropped
                self._text(CONTENT, text, events)
        elif self.state == _CALL_ID:
            self.call_id = text
            if next_state == _SECTION:  # a call with no argument marker at all
                self._call(k2_tool_call(text, "", self.tools, "the tool call has no arguments"), events)
        elif self.state == _ARGUMENTS:
            unfinished = None if next_state == _SECTION else f"the tool call has no {CALL_END}"
            self._call(k2_tool_call(self.call_id, text, self.tools, unfinished), events)
