"""Anthropic's Messages API: `POST /v1/messages` (streamed as its events, or not) and `POST /v1/messages/count_tokens`,
as the official client and Claude-Code-style agents call them.

A request becomes the same `ChatRequest` an OpenAI one does: `system` a system message, `tool_use` blocks an
assistant's tool calls, `tool_result` blocks tool messages (in the order given, before the user's text), `thinking`
blocks the assistant's reasoning_content (which K2's template keeps on tool-call turns). A reply's reasoning comes back
as a `thinking` block, its calls as `tool_use` blocks whose ids are K2's own (`functions.NAME:IDX`).
"""
import json
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from runtime.errors import K2Error
from runtime.serve.errors import RequestError
from runtime.serve.openai_api import MAX_STOP_STRINGS, parse
from runtime.serve.service import ChatRequest, Done, Service, Step
from runtime.tools import check_tools

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error"}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class Message(_Strict):
    role: Literal["user", "assistant"]
    content: str | list[dict]


class Tool(_Strict):
    name: str
    description: str | None = None
    input_schema: dict = {"type": "object", "properties": {}}


class ToolChoice(_Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class Thinking(_Strict):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = None


class MessagesRequest(_Strict):
    model: str | None = None
    messages: list[Message]
    max_tokens: Annotated[int, Field(ge=1)]
    system: str | list[dict] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    temperature: Annotated[float, Field(ge=0, le=1)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    stop_sequences: Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stream: bool = False


class CountTokensRequest(MessagesRequest):
    max_tokens: int | None = None


def _text_of(blocks, where: str) -> str:
    """Text blocks as one string (a tool result's content, the system prompt)."""
    if isinstance(blocks, str):
        return blocks
    texts = []
    for i, block in enumerate(blocks):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise RequestError(f"{where}[{i}]: only text blocks are supported here", f"{where}[{i}]")
        texts.append(block["text"])
    return "".join(texts)


def _messages(request: MessagesRequest) -> list[dict]:
    out = []
    if request.system:
        out.append({"role": "system", "content": _text_of(request.system, "system")})
    for i, m in enumerate(request.messages):
        blocks = [{"type": "text", "text": m.content}] if isinstance(m.content, str) else m.content
        text, reasoning, calls = [], [], []
        for j, block in enumerate(blocks):
            where = f"messages[{i}].content[{j}]"
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text" and isinstance(block.get("text"), str):
                text.append(block["text"])
            elif kind == "thinking" and m.role == "assistant" and isinstance(block.get("thinking"), str):
                reasoning.append(block["thinking"])
            elif kind == "redacted_thinking" and m.role == "assistant":
                continue  # only Anthropic's models can read it
            elif kind == "tool_use" and m.role == "assistant":
                if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str) or \
                        not isinstance(block.get("input"), dict):
                    raise RequestError(f"{where}: a tool_use block needs an id, a name and an input object", where)
                calls.append({"id": block["id"], "type": "function",
                              "function": {"name": block["name"],
                                           "arguments": json.dumps(block["input"], ensure_ascii=False)}})
            elif kind == "tool_result" and m.role == "user":
                if not isinstance(block.get("tool_use_id"), str):
                    raise RequestError(f"{where}.tool_use_id: is missing", f"{where}.tool_use_id")
                content = block.get("content", "")
                result = _text_of(content, f"{where}.content") if isinstance(content, (str, list)) else None
                if result is None:
                    raise RequestError(f"{where}.content: should be a string or a list of text blocks",
                                       f"{where}.content")
                out.append({"role": "tool", "tool_call_id": block["tool_use_id"],
                            "content": ("Error: " if block.get("is_error") else "") + result})
            else:
                what = f"a {kind!r} block" if isinstance(kind, str) else "a block without a type"
                raise RequestError(f"{where}: {what} is not supported in a {m.role} message", where)
        if m.role == "user" and not text and blocks and not isinstance(m.content, str):
            continue  # only tool results
        message = {"role": m.role, "content": "".join(text)}
        if reasoning:
            message["reasoning_content"] = "".join(reasoning)
        if calls:
            message["tool_calls"] = calls
        out.append(message)
    return out


def messages_request(body, service: Service, count_only: bool = False) -> tuple[MessagesRequest, ChatRequest]:
    r = parse(CountTokensRequest if count_only else MessagesRequest, body)
    tools = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                               "parameters": t.input_schema}} for t in r.tools or []]
    try:
        check_tools(tools)
    except K2Error as e:
        raise RequestError(str(e).replace(".function.", ".").replace(".parameters", ".input_schema"), "tools") from None
    choice, parallel = "auto", True
    if r.tool_choice is not None:
        parallel = not r.tool_choice.disable_parallel_tool_use
        choice = {"auto": "auto", "any": "required", "none": "none"}.get(r.tool_choice.type, r.tool_choice.name)
        if r.tool_choice.type == "tool" and r.tool_choice.name not in {t.name for t in r.tools or []}:
            raise RequestError(f"tool_choice names {r.tool_choice.name!r}, which is not in tools", "tool_choice")
        if choice == "required" and not tools:
            raise RequestError("tool_choice is 'any' but no tools are given", "tool_choice")
    template_kwargs = {}
    if r.thinking is not None and service.template.thinking_switch is not None:
        template_kwargs[service.template.thinking_switch] = r.thinking.type != "disabled"
    try:
        params = service.loaded.sampling(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k)
    except K2Error as e:
        raise RequestError(str(e)) from None
    return r, ChatRequest(messages=_messages(r), params=params, max_tokens=r.max_tokens, tools=tools or None,
                          tool_choice=choice, parallel_tool_calls=parallel, stop=list(r.stop_sequences or []),
                          template_kwargs=template_kwargs)


class MessageReply:
    """Turns the service's Steps into Anthropic's message, or into its stream of events."""

    def __init__(self, service: Service, api: MessagesRequest, request: ChatRequest, prompt_tokens: int):
        self.service, self.api, self.request, self.prompt_tokens = service, api, request, prompt_tokens
        self.id = f"msg_{uuid.uuid4().hex}"
        self.blocks: list[dict] = []  # the content blocks so far; the last one may still be growing
        self.calls = []
        self.output_tokens = 0

    def _message(self, content: list, stop_reason=None, stop_sequence=None, done: Done | None = None) -> dict:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.service.name,
                "content": content, "stop_reason": stop_reason, "stop_sequence": stop_sequence,
                "usage": self._usage(done)}

    def _usage(self, done: Done | None) -> dict:
        """Anthropic counts the prompt tokens read from a cache apart: input_tokens are the others, those computed.
        Before the request has a slot (message_start) that is not known yet: the whole prompt."""
        if done is None:
            return {"input_tokens": self.prompt_tokens, "output_tokens": 0}
        return {"input_tokens": done.prompt_tokens - done.cached_tokens, "cache_read_input_tokens": done.cached_tokens,
                "cache_creation_input_tokens": 0, "output_tokens": done.completion_tokens}

    def start(self) -> list[dict]:
        return [{"type": "message_start", "message": self._message([])}]

    def _close(self) -> list[dict]:
        if not self.blocks or self.blocks[-1].get("closed"):
            return []
        self.blocks[-1]["closed"] = True
        return [{"type": "content_block_stop", "index": len(self.blocks) - 1}]

    def _grow(self, kind: str, field: str, delta_type: str, text: str) -> list[dict]:
        """Append text to the open block of `kind`, opening one (and closing the one before) if needed."""
        events = []
        if not self.blocks or self.blocks[-1]["type"] != kind or self.blocks[-1].get("closed"):
            events += self._close()
            block = {"type": kind, field: ""} | ({"signature": ""} if kind == "thinking" else {})
            self.blocks.append(block)
            events.append({"type": "content_block_start", "index": len(self.blocks) - 1, "content_block": dict(block)})
        self.blocks[-1][field] += text
        events.append({"type": "content_block_delta", "index": len(self.blocks) - 1,
                       "delta": {"type": delta_type, field: text}})
        return events

    def events(self, step: Step) -> list[dict]:
        """The stream events one Step gives."""
        self.output_tokens += step.token is not None
        events = []
        for event in step.events:
            if event.kind == "reasoning":
                events += self._grow("thinking", "thinking", "thinking_delta", event.text)
            elif event.kind == "content":
                events += self._grow("text", "text", "text_delta", event.text)
            elif event.tool_call.error is not None:  # not a call a client could run: the model's text, kept
                events += self._grow("text", "text", "text_delta", event.tool_call.arguments)
            else:
                events += self._close()
                self.calls.append(event.tool_call)
                call_id = self.service.call_ids(self.request, self.calls)[-1]
                values = json.loads(event.tool_call.arguments)
                block = {"type": "tool_use", "id": call_id, "name": event.tool_call.name, "input": values}
                self.blocks.append(block)
                index = len(self.blocks) - 1
                events += [{"type": "content_block_start", "index": index, "content_block": block | {"input": {}}},
                           {"type": "content_block_delta", "index": index,
                            "delta": {"type": "input_json_delta", "partial_json": json.dumps(values)}}]
        return events

    def stop(self, done: Done) -> list[dict]:
        reason = "stop_sequence" if done.stop_sequence else STOP_REASONS[done.finish_reason]
        return self._close() + [
            {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": done.stop_sequence},
             "usage": self._usage(done)},
            {"type": "message_stop"}]

    def message(self, done: Done) -> dict:
        reason = "stop_sequence" if done.stop_sequence else STOP_REASONS[done.finish_reason]
        content = [{k: v for k, v in block.items() if k != "closed"} for block in self.blocks]
        return self._message(content, reason, done.stop_sequence, done)


def error_body(error: RequestError) -> dict:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(error.status, "api_error"), "message": str(error)}}
