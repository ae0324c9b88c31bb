"""K2 reply parsing. Expected values are read off the format itself (KIMI_K2.md §4, K2-Thinking's template), and the
round trip goes through transformers' rendering of the parsed message with the real K2-Thinking template."""
import json

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from runtime.chat_format import ReplyParser, ToolCall, parse_reply
from runtime.models.deepseek_v3_demo import CHAT_TEMPLATE

SECTION = "<|tool_calls_section_begin|>{}<|tool_calls_section_end|>"


def call(call_id: str, arguments: str) -> str:
    return f"<|tool_call_begin|>{call_id}<|tool_call_argument_begin|>{arguments}<|tool_call_end|>"


WEATHER = call("functions.get_weather:0", '{"city": "Paris"}')
TIME = call("functions.get_time:1", '{"zone": "Europe/Paris", "format": "24h"}')

CASES = {
    "plain answer": ("The capital of France is Paris.", "", "The capital of France is Paris.", []),
    "think then answer": ("<think>The user asks for a capital.\nParis.</think>It is Paris.",
                          "The user asks for a capital.\nParis.", "It is Paris.", []),
    "tool call after think": ("<think>I need the weather.</think>Let me check." + SECTION.format(WEATHER),
                              "I need the weather.", "Let me check.",
                              [("functions.get_weather:0", "get_weather", '{"city": "Paris"}', None)]),
    "two parallel tool calls": ("<think>Both.</think>" + SECTION.format(WEATHER + TIME), "Both.", "",
                                [("functions.get_weather:0", "get_weather", '{"city": "Paris"}', None),
                                 ("functions.get_time:1", "get_time", '{"zone": "Europe/Paris", "format": "24h"}', None)]),
    "tool call inside an unclosed think": ("<think>I should call the tool" + SECTION.format(WEATHER),
                                           "I should call the tool", "",
                                           [("functions.get_weather:0", "get_weather", '{"city": "Paris"}', None)]),
    "chinese and emoji": ("<think>用户在打招呼 🙂</think>你好！👋 有什么可以帮你？", "用户在打招呼 🙂", "你好！👋 有什么可以帮你？", []),
    "markers look-alikes stay text": ("a <thinking> b < /think> c <|tool", "", "a <thinking> b < /think> c <|tool", []),
    "unclosed think": ("<think>still going", "still going", "", []),
}


@pytest.mark.parametrize("name", CASES)
def test_finished_reply(name):
    text, reasoning, content, calls = CASES[name]
    reply = parse_reply(text)
    assert reply.reasoning_content == reasoning
    assert reply.content == content
    assert [(c.id, c.name, c.arguments, c.error) for c in reply.tool_calls] == calls


def test_malformed_arguments_are_kept_raw_and_flagged():
    text = SECTION.format(call("functions.search:0", '{"query": "kimi", ') + call("functions.f:1", "[1, 2]")
                          + call("search", "{}"))
    calls = parse_reply(text).tool_calls
    assert [c.arguments for c in calls] == ['{"query": "kimi", ', "[1, 2]", "{}"]
    assert "not valid JSON" in calls[0].error
    assert calls[1].error == "arguments are not a JSON object"
    assert "functions.NAME:INDEX" in calls[2].error and calls[2].name == "search"
    with pytest.raises(json.JSONDecodeError):  # truly malformed, and still there to show the user
        json.loads(calls[0].arguments)


def test_reply_cut_inside_a_tool_call_keeps_the_call():
    reply = parse_reply("<think>hm</think>" + "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
                        "<|tool_call_argument_begin|>{\"city\": \"Par")
    assert reply.content == "" and len(reply.tool_calls) == 1
    assert reply.tool_calls[0].arguments == '{"city": "Par'
    assert reply.tool_calls[0].name == "get_weather" and "ended inside" in reply.tool_calls[0].error


def test_prompt_that_opens_the_think_block():
    reply = parse_reply("reasoning here</think>answer", in_reasoning=True)
    assert (reply.reasoning_content, reply.content) == ("reasoning here", "answer")


def _chunked(text: str, cuts: list[int], in_reasoning=False):
    parser = ReplyParser(in_reasoning)
    events = []
    for a, b in zip([0] + cuts, cuts + [len(text)]):
        events += parser.feed(text[a:b])
    events += parser.finish()
    return parser.reply, events


@pytest.mark.parametrize("name", CASES)
def test_streaming_split_at_every_boundary_equals_the_whole(name):
    text = CASES[name][0]
    whole = parse_reply(text)
    for cut in range(len(text) + 1):  # every two-piece split, markers cut anywhere
        reply, events = _chunked(text, [cut])
        assert reply == whole, cut
        # The events alone rebuild the reply: what a streaming client shows is what the history stores.
        assert "".join(e.text for e in events if e.kind == "reasoning") == whole.reasoning_content
        assert "".join(e.text for e in events if e.kind == "content") == whole.content
        assert [e.tool_call for e in events if e.kind == "tool_call"] == whole.tool_calls
    assert _chunked(text, list(range(1, len(text))))[0] == whole  # one character at a time


def test_streaming_split_at_every_token_boundary(demo_dir):
    """Cut where the demo's K2 tokenizer cuts: special tokens arrive whole, text in BPE pieces."""
    from runtime.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_folder(demo_dir)
    text = "<think>Weather first. 天气</think>Checking 🙂" + SECTION.format(WEATHER + TIME)
    ids = tokenizer.encode_with_added(text)
    stream = tokenizer.stream()
    pieces = [stream.push(i) for i in ids] + [stream.finish()]
    assert "".join(pieces) == text
    cuts = [len("".join(pieces[:k])) for k in range(1, len(pieces))]
    assert _chunked(text, cuts)[0] == parse_reply(text)


def test_parsed_message_renders_back_through_the_template():
    """The parsed reply, stored as an OpenAI message, is what K2-Thinking's template (rendered by transformers)
    writes for the current turn: reasoning, content and the tool-call section, byte for byte."""
    template = CHAT_TEMPLATE.read_text()
    reply_text = "<think>I need the weather.</think>Let me check." + SECTION.format(WEATHER + TIME)
    message = parse_reply(reply_text).to_message()
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "weather?"}, message]
    rendered = render_jinja_template([messages], chat_template=template)[0][0]
    assert rendered.endswith("<|im_assistant|>assistant<|im_middle|>" + reply_text + "<|im_end|>")


def test_tool_call_message_shape():
    assert ToolCall.parse("functions.a.b:3", "{}").to_message() == {
        "id": "functions.a.b:3", "type": "function", "function": {"name": "b", "arguments": "{}"}}
