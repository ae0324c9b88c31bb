"""A chat over one model whose KV cache lives as long as the conversation.

Every turn renders the whole conversation with the model's template, then keeps the longest prefix the cache
already holds and prefills only the rest: normally just the new user message, and from the first difference when
the history changed (an edited or loaded conversation, reasoning the template drops from past turns). A conversation
that outgrows the context loses its oldest turns, never the system prompt, and the caller is told.
"""
import time
from collections.abc import Iterator
from dataclasses import dataclass

from runtime.chat_format import THINK_CLOSE, Event, ReplyParser
from runtime.chat_template import ChatTemplate
from runtime.engine import new_token_budget
from runtime.errors import K2Error
from runtime.sampling import Sampler, SamplingParams
from runtime.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Notice:
    """Something the user should know about the turn (the conversation was trimmed to fit)."""
    text: str


@dataclass
class TurnStats:
    prompt_tokens: int  # the whole rendered conversation
    reused_tokens: int  # served from the cache
    prefilled_tokens: int  # computed this turn
    new_tokens: int = 0
    first_token_s: float | None = None  # from the message to the first new token: render, prefill, first draw
    decode_s: float = 0.0  # from the first new token to the last
    stop: str = "interrupted"  # "end of turn", "max tokens", "context full" or "interrupted"

    @property
    def decode_tok_s(self) -> float | None:
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else None

    def line(self) -> str:
        ttft = f"{self.first_token_s:.2f} s" if self.first_token_s is not None else "-"
        speed = f"{self.decode_tok_s:.1f} tok/s" if self.decode_tok_s is not None else "- tok/s"
        return (f"[{self.prompt_tokens} prompt tokens ({self.prefilled_tokens} prefilled, {self.reused_tokens} cached), "
                f"{self.new_tokens} new, first token {ttft}, decode {speed}, stop: {self.stop}]")


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many ids `a` and `b` share from the start: a bisection over slice comparisons, which run in C (the server
    compares a history of tens of thousands of ids with every slot and stored prefix at each admission)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def reply_starts_in_reasoning(reply_parser: type[ReplyParser], template: ChatTemplate, tokenizer: Tokenizer,
                              prompt_ids: list[int]) -> bool:
    """Whether the reply to `prompt_ids` starts inside a think block, by the reply format's rule, from where the
    prompt leaves it and whether the model thinks at all (its template writes `</think>`, a token of its vocabulary)."""
    thinks = THINK_CLOSE in template.literal_text and THINK_CLOSE in tokenizer.special_tokens
    return reply_parser.starts_in_reasoning(tokenizer.decode(prompt_ids[-4:]), thinks)


def check_messages(messages) -> list[dict]:
    """A conversation in the OpenAI shape, as /load reads it: a list of {"role", "content", ...} objects."""
    if not isinstance(messages, list):
        raise K2Error("a conversation is a JSON list of messages (or an object with a 'messages' list)")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise K2Error(f"message {i} needs a 'role' of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), (str, list, type(None))):
            raise K2Error(f"message {i}: 'content' must be a string, a list of parts, or null")
    return messages


class ChatSession:
    """A conversation in slot 0 of `engine`, whose cache length is the context."""

    def __init__(self, engine, tokenizer: Tokenizer, template: ChatTemplate, stop_ids: set[int],
                 reply_parser: type[ReplyParser], system: str | None = None, tools: list[dict] | None = None):
        self.engine, self.tokenizer, self.template, self.reply_parser = engine, tokenizer, template, reply_parser
        self.stop_ids = set(stop_ids)
        self.max_context = engine.max_len
        self.tools = tools
        self.template_kwargs: dict = {}
        self.messages: list[dict] = [{"role": "system", "content": system}] if system is not None else []
        self.cache_ids: list[int] = []  # the tokens whose keys and values the cache holds, in order
        self.turns: list[TurnStats] = []

    # The conversation -------------------------------------------------------------------------------------------

    @property
    def system(self) -> str | None:
        return self.messages[0]["content"] if self.messages and self.messages[0]["role"] == "system" else None

    def set_system(self, text: str | None):
        if self.system is not None:
            self.messages.pop(0)
        if text:
            self.messages.insert(0, {"role": "system", "content": text})

    def reset(self):
        """Forget the conversation but the system prompt; the cache keeps serving the prefix they share."""
        self.messages = self.messages[:1] if self.system is not None else []

    def load(self, messages: list[dict]):
        self.messages = [dict(m) for m in check_messages(messages)]

    def set_thinking(self, on: bool):
        switch = self.template.thinking_switch
        if switch is None:
            raise K2Error("this model's chat template has no thinking switch")
        self.template_kwargs[switch] = on

    def prompt_ids(self, messages: list[dict] | None = None) -> list[int]:
        return self.template.encode(self.tokenizer, self.messages if messages is None else messages, self.tools,
                                    add_generation_prompt=True, **self.template_kwargs)

    # A turn -----------------------------------------------------------------------------------------------------

    def _fit(self, reserve: int) -> tuple[list[int], int]:
        """Prompt ids with room for `reserve` new tokens, dropping the oldest turns (a user message and what
        answered it) but never the system prompt nor the newest user message. Nothing is dropped if it cannot fit."""
        messages, dropped = list(self.messages), 0
        first = 1 if self.system is not None else 0
        while True:
            ids = self.prompt_ids(messages)
            if len(ids) + reserve <= self.max_context:
                self.messages = messages
                return ids, dropped
            next_user = next((i for i in range(first + 1, len(messages)) if messages[i]["role"] == "user"), None)
            if next_user is None:
                raise K2Error(f"the message needs {len(ids)} tokens plus {reserve} for the reply, but the context holds "
                              f"{self.max_context} (shorten it, lower --max-tokens or raise --ctx)")
            dropped += next_user - first
            del messages[first:next_user]

    def send(self, text: str, params: SamplingParams, max_new_tokens: int) -> Iterator[Event | Notice]:
        """Add a user message and stream the reply: reasoning and content deltas, finished tool calls, notices.
        Closing the stream early (Ctrl-C) keeps what was said so far; `turns[-1]` holds the turn's numbers."""
        started = time.perf_counter()
        self.messages.append({"role": "user", "content": text})
        try:
            ids, dropped = self._fit(min(max_new_tokens, self.max_context // 2))
        except BaseException:  # a message that cannot be sent (or Ctrl-C while rendering) is not kept
            self.messages.pop()
            raise
        # At least one token is computed again: its logits start the reply.
        reused = min(common_prefix(self.cache_ids, ids), len(ids) - 1)
        self.engine.truncate(0, reused)
        self.cache_ids = ids[:reused]
        stats = TurnStats(len(ids), reused, len(ids) - reused)
        self.turns.append(stats)
        in_reasoning = reply_starts_in_reasoning(self.reply_parser, self.template, self.tokenizer, ids)
        parser = self.reply_parser(in_reasoning=in_reasoning, tools=self.tools)
        stream = self.tokenizer.stream()
        generated: list[int] = []
        finished = False
        try:
            if dropped:
                yield Notice(f"the conversation outgrew the context of {self.max_context} tokens: dropped the "
                             f"{dropped} oldest message(s){', kept the system prompt' if self.system is not None else ''}")
            model = self.engine.model
            sampler = Sampler(params, model.args.vocab_size, device=model.device)
            budget = new_token_budget(len(ids), max_new_tokens, self.max_context)
            first_at = None
            for token in self.engine.stream(0, ids, sampler, budget, self.stop_ids, keep=reused):
                now = time.perf_counter()
                first_at = first_at or now
                stats.first_token_s, stats.decode_s = first_at - started, now - first_at
                generated.append(token)
                stats.new_tokens = len(generated)
                if token in self.stop_ids:
                    stats.stop = "end of turn"
                    break
                yield from parser.feed(stream.push(token))
            else:
                stats.stop = "max tokens" if budget == max_new_tokens else "context full"
            yield from parser.feed(stream.finish())
            yield from parser.finish()
            finished = True
        finally:
            if not finished:  # stopped mid-reply: keep the text held back for a possible marker too
                parser.feed(stream.finish())
                parser.finish()
            # Whatever happened, the cache holds exactly its first `length` tokens of what was fed.
            self.cache_ids = (ids + generated)[:self.engine.length(0)]
            if generated:
                self.messages.append(parser.reply.to_message())
            else:
                self.messages.pop()  # nothing was said: the turn did not happen
