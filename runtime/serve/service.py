"""What both APIs ask of the model, in one shape (`ChatRequest`), and how it is answered: the conversation rendered by
the model's own template, its tokens decoded by the worker, the text parsed by the model's reply format.

The OpenAI and Anthropic endpoints (openai_api.py, anthropic_api.py) only translate requests into a `ChatRequest` and
the `Step`s and `Done` that `Service.chat` yields back into their own shapes.
"""
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from runtime.chat_format import Event
from runtime.engine import new_token_budget
from runtime.serve.errors import RequestError
from runtime.sampling import SamplingParams
from runtime.serve.worker import Job, Token, Worker
from runtime.session import reply_starts_in_reasoning


@dataclass
class ChatRequest:
    messages: list[dict]  # OpenAI's shape: role, content (text), tool_calls, tool_call_id, reasoning_content
    params: SamplingParams
    max_tokens: int | None = None  # None: as many as the context leaves
    tools: list[dict] | None = None  # OpenAI's shape, checked (runtime/tools.py)
    tool_choice: str | None = "auto"  # "auto", "none", "required", or a function's name
    parallel_tool_calls: bool = True
    stop: list[str] = field(default_factory=list)
    template_kwargs: dict = field(default_factory=dict)
    top_logprobs: int | None = None  # None: no log-probabilities
    ignore_eos: bool = False  # decode max_tokens whatever the model says (benchmarks)


@dataclass
class Prompt:
    ids: list[int]
    forced: str = ""  # text the reply starts with, already in `ids` (a tool call forced by tool_choice)
    in_reasoning: bool = False  # the reply starts inside a think block


@dataclass
class Step:
    """What one drawn token gave: the text events its text completed (none while the parser holds text back)."""
    token: Token | None  # None: the text held back at the end
    events: list[Event]


@dataclass
class Done:
    finish_reason: str  # "stop", "length" or "tool_calls" (OpenAI's names)
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    token_ids: list[int]
    stop_sequence: str | None = None  # the stop string that ended the reply


class StopStrings:
    """Cuts a stream of text at the first of `stops`: text that could be the start of one is held back until the
    next piece tells."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.found: str | None = None

    def feed(self, text: str) -> str:
        if not self.stops:
            return text
        text = self.held + text
        hits = [(at, s) for s in self.stops if (at := text.find(s)) >= 0]
        if hits:
            at, self.found = min(hits)
            self.held = ""
            return text[:at]
        keep = max((n for s in self.stops for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if s.startswith(text[-n:])), default=0)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep]

    def finish(self) -> str:
        text, self.held = self.held, ""
        return text


def _owned(job: Job, steps: AsyncIterator) -> AsyncIterator:
    """`steps`, which cancel `job` when closed; and when dropped unread too (a client that left before its stream
    began): an async generator that never started does not run its `finally`."""
    weakref.finalize(steps, job.cancel)
    return steps


class Service:
    """One loaded model behind the server: its tokenizer, template, reply format and the worker that decodes."""

    def __init__(self, loaded, worker: Worker, context: int, name: str):
        self.loaded, self.worker, self.context, self.name = loaded, worker, context, name
        self.tokenizer, self.template = loaded.tokenizer, loaded.template
        self.reply_parser = loaded.reply_parser
        self.stop_ids = loaded.chat_stop_ids()
        self.eos_ids = loaded.eos_ids
        self.vocab_size = loaded.args.vocab_size
        self.created = int(time.time())

    # Prompts ----------------------------------------------------------------------------------------------------

    def render(self, request: ChatRequest) -> Prompt:
        """The prompt ids of `request`'s conversation as the model's template writes it, with K2's tool call ids
        (runtime/chat_format `canonical_history`) and, where tool_choice forces a call, the call's start."""
        messages = self.reply_parser.canonical_history(request.messages)
        tools = request.tools if request.tool_choice != "none" else None
        ids = self.template.encode(self.tokenizer, messages, tools, add_generation_prompt=True,
                                   **request.template_kwargs)
        forced = ""
        if request.tools and request.tool_choice not in ("auto", "none"):
            name = None if request.tool_choice == "required" else request.tool_choice
            calls = sum(len(m.get("tool_calls") or []) for m in messages if m.get("role") == "assistant")
            forced = self.reply_parser.forced_call(name, calls)
            ids = ids + self.tokenizer.encode_marked(forced, self.template.control_tokens(self.tokenizer))
        # A forced call starts the reply outside any think block.
        in_reasoning = not forced and reply_starts_in_reasoning(self.reply_parser, self.template, self.tokenizer, ids)
        self.check_length(len(ids))
        return Prompt(ids, forced, in_reasoning)

    def check_length(self, prompt_tokens: int):
        if prompt_tokens >= self.context:
            raise RequestError(f"the prompt has {prompt_tokens} tokens and the context holds {self.context}: "
                               f"{prompt_tokens - self.context + 1} too many (the reply needs at least one)",
                               "messages")

    def budget(self, prompt_tokens: int, max_tokens: int | None) -> int:
        return new_token_budget(prompt_tokens, max_tokens or self.context, self.context)

    # Generation -------------------------------------------------------------------------------------------------

    def submit(self, ids: list[int], params: SamplingParams, max_new_tokens: int, stop_ids: set[int],
               top_logprobs: int | None) -> Job:
        return self.worker.submit(Job(ids, params, max_new_tokens, stop_ids, top_logprobs))

    def chat(self, request: ChatRequest, prompt: Prompt) -> AsyncIterator[Step | Done]:
        """The reply to `request`, a Step per drawn token and a Done at the end. It is queued now, so a full queue
        is an error (429) before any of the reply is sent. Closing the iterator early (the client left), or dropping
        it unread, stops the decoding."""
        budget = self.budget(len(prompt.ids), request.max_tokens)
        stop_ids = set() if request.ignore_eos else self.stop_ids
        job = self.submit(prompt.ids, request.params, budget, stop_ids, request.top_logprobs)
        return _owned(job, self._chat(request, prompt, job, stop_ids))

    async def _chat(self, request: ChatRequest, prompt: Prompt, job: Job, stop_ids: set[int]) -> \
            AsyncIterator[Step | Done]:
        parser = self.reply_parser(in_reasoning=prompt.in_reasoning, tools=request.tools)
        stream, stops = self.tokenizer.stream(), StopStrings(request.stop)
        generated, finish = [], "length"
        try:
            if prompt.forced:
                parser.feed(prompt.forced)
            async for token in job:
                generated.append(token.id)
                if token.id in stop_ids:
                    finish = "stop"
                    yield Step(token, [])
                    break
                events = parser.feed(stops.feed(stream.push(token.id)))
                if stops.found is None and not request.parallel_tool_calls and parser.reply.tool_calls:
                    stops.found = ""  # one call was asked for: the reply ends with it
                if stops.found is not None:
                    finish = "stop"
                    events += parser.feed(stops.finish())
                    yield Step(token, events)
                    break
                yield Step(token, events)
            events = [] if stops.found is not None else parser.feed(stops.feed(stream.finish()) + stops.finish())
            events += parser.finish()
            if events:
                yield Step(None, events)
        finally:
            job.cancel()
        if parser.reply.tool_calls and finish == "stop":
            finish = "tool_calls"
        yield Done(finish, len(prompt.ids), len(generated), job.cached_tokens, generated, stops.found or None)

    def complete(self, ids: list[int], params: SamplingParams, max_tokens: int, stop: list[str],
                 top_logprobs: int | None, ignore_eos: bool = False) -> AsyncIterator[tuple[Token | None, str] | Done]:
        """Raw completion of `ids` (no template): each drawn token with the text it completed, then a Done. It ends
        at an end-of-sequence id, as `k2 generate` does, or at a stop string. Queued now, as `chat` is."""
        self.check_length(len(ids))
        budget = self.budget(len(ids), max_tokens)
        eos_ids = set() if ignore_eos else self.eos_ids
        job = self.submit(ids, params, budget, eos_ids, top_logprobs)
        return _owned(job, self._complete(ids, stop, job, eos_ids))

    async def _complete(self, ids: list[int], stop: list[str], job: Job, eos_ids: set[int]) -> \
            AsyncIterator[tuple[Token | None, str] | Done]:
        stream, stops = self.tokenizer.stream(), StopStrings(stop)
        generated, finish = [], "length"
        try:
            async for token in job:
                generated.append(token.id)
                if token.id in eos_ids:
                    finish = "stop"
                    yield token, stops.feed(stream.finish()) + stops.finish()
                    break
                text = stops.feed(stream.push(token.id))
                if stops.found is not None:
                    finish = "stop"
                    yield token, text
                    break
                yield token, text
            else:
                tail = stops.feed(stream.finish())
                if stops.found is None:
                    tail += stops.finish()
                if tail:
                    yield None, tail
        finally:
            job.cancel()
        yield Done(finish, len(ids), len(generated), job.cached_tokens, generated, stops.found)

    def call_ids(self, request: ChatRequest, calls: list) -> list[str]:
        """The ids a reply's tool calls are returned by: those the model would read them by in the next turn's
        history (K2's `functions.NAME:IDX`, counted over the conversation)."""
        message = {"role": "assistant", "content": "", "tool_calls": [c.to_message() for c in calls]}
        history = self.reply_parser.canonical_history([*request.messages, message])
        return [c["id"] for c in history[-1]["tool_calls"]]
