"""A model's reply parsed into the OpenAI message shape (reasoning_content, content, tool_calls), finished or as a
stream, by the reply format its family names (runtime/models/family.py `reply_format`): Kimi K2's tool-call section
(kimi_k2.py, whose state machine the other formats share) or the Hermes `<tool_call>` JSON blocks of Qwen3 and of
Llama-family chat models (hermes.py). In every format a stream gives what the finished reply gives however it is cut,
and nothing the model wrote is dropped: a malformed call is kept and flagged."""
from runtime.chat_format.hermes import LlamaParser, Qwen3Parser
from runtime.chat_format.kimi_k2 import HOLD_LIMIT, ReplyParser
from runtime.chat_format.reply import THINK_CLOSE, THINK_OPEN, UNKNOWN_NAME, Event, Reply, ToolCall

__all__ = ["HOLD_LIMIT", "REPLY_PARSERS", "THINK_CLOSE", "THINK_OPEN", "UNKNOWN_NAME", "Event", "LlamaParser",
           "Qwen3Parser", "Reply", "ReplyParser", "ToolCall", "parse_reply"]

# Reply formats by the name a model family gives.
REPLY_PARSERS: dict[str, type[ReplyParser]] = {"kimi_k2": ReplyParser, "qwen3": Qwen3Parser, "llama": LlamaParser}


def parse_reply(text: str, parser: type[ReplyParser] = ReplyParser, **options) -> Reply:
    """A finished reply; `options` as the parser takes them."""
    reply_parser = parser(**options)
    reply_parser.feed(text)
    reply_parser.finish()
    return reply_parser.reply
