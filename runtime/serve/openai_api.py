"""OpenAI's API: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`, as the official client and
the agents built on it call them.

Requests are checked strictly (a wrong type is a 400 naming the field, never a value converted behind the client's
back); fields other servers accept and k2 cannot honour yet are refused by name rather than ignored. Vendor fields
that change nothing (`user`, `metadata`, `store`, ...) are ignored. vLLM's extensions `top_k`, `min_p`,
`repetition_penalty`, `chat_template_kwargs`, `return_token_ids` and `ignore_eos` are accepted too.
"""
import json
import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from runtime.errors import K2Error
from runtime.sampling import SamplingParams
from runtime.serve.errors import RequestError, validation_error
from runtime.serve.service import ChatRequest, Done, Service
from runtime.serve.worker import MAX_TOP_LOGPROBS, Token
from runtime.tools import check_tools

MAX_STOP_STRINGS = 16
# The names a prompt is rendered with (the template's own variables, and ChatTemplate.encode's arguments): the request's
# fields set them, and chat_template_kwargs may not.
RENDER_ARGUMENTS = {"messages", "tools", "documents", "add_generation_prompt", "tokenizer", "self"}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class FunctionCall(_Strict):
    name: str
    arguments: str | dict  # a JSON object's text, as OpenAI sends it (some clients send the object)


class ToolCallIn(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None  # what newer clients call reasoning_content


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"] = "function"
    function: NamedFunction


class StreamOptions(_Strict):
    include_usage: bool = True


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]


class Sampling(_Strict):
    """The sampling fields both endpoints take; None: the model's generation_config.json default."""
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Literal[0] = 0
    frequency_penalty: Literal[0] = 0
    logit_bias: Annotated[dict, Field(max_length=0)] | None = None
    return_token_ids: bool = False
    ignore_eos: bool = False
    model: str | None = None

    def sampling(self, service: Service) -> SamplingParams:
        overrides = {k: getattr(self, k) for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                                                   "seed")}
        return service.loaded.sampling(**overrides)

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise RequestError(f"stop: at most {MAX_STOP_STRINGS} strings", "stop")
        return stops


class ChatCompletionRequest(Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    tools: list | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    chat_template_kwargs: dict | None = None
    response_format: ResponseFormat | None = None


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16  # OpenAI's default for completions
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None  # the legacy API's limit
    echo: bool = False
    suffix: None = None


def parse(model: type[BaseModel], body) -> BaseModel:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from None


def _text(content, where: str) -> str | None:
    """A message's content as text: a string, or a list of text parts (anything else is refused by name)."""
    if content is None or isinstance(content, str):
        return content
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type")
        if kind != "text" or not isinstance(part.get("text"), str):
            what = f"a {kind!r} part" if isinstance(kind, str) else "a part without a type"
            raise RequestError(f"{where}[{i}]: {what}; only text parts ({{\"type\": \"text\", \"text\": ...}}) are "
                               "supported", f"{where}[{i}]")
        texts.append(part["text"])
    return "".join(texts)


def _messages(messages: list[Message]) -> list[dict]:
    """The conversation in the plain shape templates read."""
    out = []
    for i, m in enumerate(messages):
        message = {"role": "system" if m.role == "developer" else m.role,
                   "content": _text(m.content, f"messages[{i}].content")}
        if m.role == "tool" or m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            message["name"] = m.name
        reasoning = m.reasoning_content if m.reasoning_content is not None else m.reasoning
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        if m.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.function.name,
                              "arguments": c.function.arguments if isinstance(c.function.arguments, str)
                              else json.dumps(c.function.arguments, ensure_ascii=False)}}
                for c in m.tool_calls]
        out.append(message)
    return out


def chat_request(body, service: Service) -> tuple[ChatCompletionRequest, ChatRequest]:
    """The request checked, and what it asks of the model."""
    r = parse(ChatCompletionRequest, body)
    if r.response_format is not None and r.response_format.type != "text":
        raise RequestError(f"response_format {r.response_format.type} is not supported: k2 has no constrained "
                           "decoding yet; ask for JSON in the prompt instead", "response_format")
    tools = None
    if r.tools is not None:
        try:
            check_tools(r.tools)
        except K2Error as e:
            raise RequestError(str(e), "tools") from None
        tools = r.tools or None
    choice = r.tool_choice
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in {t["function"]["name"] for t in tools or []}:
            raise RequestError(f"tool_choice names {choice.function.name!r}, which is not in tools", "tool_choice")
        choice = choice.function.name
    elif choice == "required" and not tools:
        raise RequestError("tool_choice is 'required' but no tools are given", "tool_choice")
    if taken := sorted(RENDER_ARGUMENTS & set(r.chat_template_kwargs or {})):
        raise RequestError(f"chat_template_kwargs: {taken[0]!r} is not a template option (k2 renders the prompt "
                           "with that name itself)", "chat_template_kwargs")
    try:
        params = r.sampling(service)
    except K2Error as e:
        raise RequestError(str(e)) from None
    top = (r.top_logprobs or 0) if r.logprobs else None
    return r, ChatRequest(
        messages=_messages(r.messages), params=params, max_tokens=r.max_completion_tokens or r.max_tokens,
        tools=tools, tool_choice=choice or "auto", parallel_tool_calls=r.parallel_tool_calls, stop=r.stops(),
        template_kwargs=r.chat_template_kwargs or {}, top_logprobs=top, ignore_eos=r.ignore_eos)


# Responses ----------------------------------------------------------------------------------------------------------


def _token_logprob(service: Service, token: Token) -> dict:
    def entry(token_id, logprob):
        text = service.tokenizer.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return entry(token.id, token.logprob) | {"top_logprobs": [entry(i, lp) for i, lp in token.top]}


def usage(done: Done) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": done.cached_tokens}}


class ChatReply:
    """Turns the service's Steps into OpenAI's message, or into its stream of chunks."""

    def __init__(self, service: Service, api: ChatCompletionRequest, request: ChatRequest, prompt_ids: list[int]):
        self.service, self.api, self.request, self.prompt_ids = service, api, request, prompt_ids
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        self.reasoning, self.content, self.calls, self.logprobs = "", "", [], []

    def _chunk(self, delta: dict, finish: str | None = None, logprobs: list | None = None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": {"content": logprobs} if logprobs else None,
                  "finish_reason": finish}
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.service.name, "choices": [choice]}

    def deltas(self, step) -> list[dict]:
        """The deltas one Step gives, in order."""
        out = []
        for event in step.events:
            if event.kind == "reasoning":
                self.reasoning += event.text
                out.append({"reasoning_content": event.text})
            elif event.kind == "content":
                self.content += event.text
                out.append({"content": event.text})
            else:
                index = len(self.calls)
                self.calls.append(event.tool_call)
                call_id = self.service.call_ids(self.request, self.calls)[-1]
                out.append({"tool_calls": [{"index": index, "id": call_id, "type": "function",
                                            "function": {"name": event.tool_call.name, "arguments": ""}}]})
                out.append({"tool_calls": [{"index": index, "function": {"arguments": event.tool_call.arguments}}]})
        return out

    def chunks(self, step) -> list[dict]:
        """Stream chunks for one Step: one per delta; a token's log-probability rides on the first (or on an empty
        delta where the parser held its text back)."""
        logprobs = [_token_logprob(self.service, step.token)] if self.request.top_logprobs is not None and \
            step.token is not None else None
        deltas = self.deltas(step)
        if not deltas and logprobs:
            deltas = [{}]
        return [self._chunk(d, logprobs=logprobs if i == 0 else None) for i, d in enumerate(deltas)]

    def first_chunk(self) -> dict:
        chunk = self._chunk({"role": "assistant", "content": ""})
        if self.api.return_token_ids:
            chunk["prompt_token_ids"] = self.prompt_ids
        return chunk

    def last_chunks(self, done: Done) -> list[dict]:
        chunks = [self._chunk({}, done.finish_reason)]
        options = self.api.stream_options
        if options is None or options.include_usage:
            chunks.append({**self._chunk({}), "choices": [], "usage": usage(done)})
        return chunks

    def message(self, done: Done) -> dict:
        message = {"role": "assistant", "content": self.content or (None if self.calls else "")}
        if self.reasoning:
            message["reasoning_content"] = self.reasoning
        if self.calls:
            ids = self.service.call_ids(self.request, self.calls)
            message["tool_calls"] = [call.to_message() | {"id": i} for call, i in zip(self.calls, ids)]
        choice = {"index": 0, "message": message, "finish_reason": done.finish_reason,
                  "logprobs": {"content": self.logprobs} if self.request.top_logprobs is not None else None}
        response = {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.service.name,
                    "choices": [choice], "usage": usage(done)}
        if self.api.return_token_ids:
            response["prompt_token_ids"] = self.prompt_ids
            choice["token_ids"] = done.token_ids
        return response

    def add(self, step):
        """A Step of a reply that is not streamed."""
        if self.request.top_logprobs is not None and step.token is not None:
            self.logprobs.append(_token_logprob(self.service, step.token))
        self.deltas(step)


def completion_request(body, service: Service) -> tuple[CompletionRequest, list[int]]:
    r = parse(CompletionRequest, body)
    prompt = r.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise RequestError("prompt: one prompt per request (n=1)", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = service.tokenizer.encode(prompt)
        if service.tokenizer.bos_id is not None:
            ids = [service.tokenizer.bos_id, *ids]
    else:
        ids = list(prompt)
        if any(not 0 <= i < service.vocab_size for i in ids):
            raise RequestError(f"prompt: token ids must lie in [0, {service.vocab_size})", "prompt")
    if not ids:
        raise RequestError("prompt is empty: there is nothing to continue", "prompt")
    return r, ids


class CompletionReply:
    def __init__(self, service: Service, api: CompletionRequest, ids: list[int]):
        self.service, self.api, self.ids = service, api, ids
        self.id, self.created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        self.text = service.tokenizer.decode(ids) if api.echo else ""
        self.logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def _logprobs(self, token: Token | None, text: str) -> dict | None:
        if self.api.logprobs is None:
            return None
        entry = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        if token is not None:
            decode = self.service.tokenizer.decode
            entry = {"tokens": [decode([token.id])], "token_logprobs": [token.logprob],
                     "top_logprobs": [{decode([i]): lp for i, lp in token.top}], "text_offset": [len(self.text)]}
        for key, values in entry.items():
            self.logprobs[key] += values
        return entry

    def chunk(self, token: Token | None, text: str) -> dict:
        """A streamed piece of the completion: the text a token completed (with the token's id, as vLLM sends it,
        where return_token_ids asks)."""
        logprobs = self._logprobs(token, text)
        self.text += text
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": None}
        if self.api.return_token_ids:
            choice["token_ids"] = [token.id] if token is not None else []
        return self._body([choice])

    def _body(self, choices: list[dict], done: Done | None = None) -> dict:
        body = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.service.name,
                "choices": choices}
        if done is not None:
            body["usage"] = usage(done)
        return body

    def last_chunks(self, done: Done) -> list[dict]:
        chunks = [self._body([{"index": 0, "text": "", "logprobs": None, "finish_reason": done.finish_reason}])]
        if self.api.stream_options is None or self.api.stream_options.include_usage:
            chunks.append(self._body([], done))
        return chunks

    def response(self, done: Done) -> dict:
        choice = {"index": 0, "text": self.text, "finish_reason": done.finish_reason,
                  "logprobs": self.logprobs if self.api.logprobs is not None else None}
        body = self._body([choice], done)
        if self.api.return_token_ids:
            body["prompt_token_ids"] = self.ids
            choice["token_ids"] = done.token_ids
        return body


def models(service: Service) -> dict:
    return {"object": "list", "data": [{"id": service.name, "object": "model", "created": service.created,
                                        "owned_by": "k2", "max_model_len": service.context}]}


def error_body(error: RequestError) -> dict:
    kinds = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error"}
    kind = kinds.get(error.status, "invalid_request_error" if error.status < 500 else "server_error")
    return {"error": {"message": str(error), "type": kind, "param": error.param, "code": error.status}}
