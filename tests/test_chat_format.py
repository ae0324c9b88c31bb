"""K2 reply parsing. Expected values are read off the format itself (KIMI_K2.md §4, K2-Thinking's template), and the
round trip goes through transformers' rendering of the parsed message with the real K2-Thinking template."""
import json

import pytest
from transformers.utils import get_json_schema
from transformers.utils.chat_template_utils import render_jinja_template

from runtime.chat_format import HOLD_LIMIT, REPLY_PARSERS, UNKNOWN_NAME, ReplyParser, parse_reply
from runtime.chat_format.kimi_k2 import CALL_BEGIN, SECTION_BEGIN, SECTION_END, k2_tool_call
from runtime.models.deepseek_v3_demo import CHAT_TEMPLATE

SECTION = "<|tool_calls_section_begin|>{}<|tool_calls_section_end|>"


def call(call_id: str, arguments: str) -> str:
    return f"<|tool_call_begin|>{call_id}<|tool_call_argument_begin|>{arguments}<|tool_call_end|>"


WEATHER = call("functions.get_weather:0", '{"city": "Paris"}')
TIME = call("functions.get_time:1", '{"zone": "Europe/Paris", "format": "24h"}')
WEATHER_CALL = ("functions.get_weather:0", "get_weather", '{"city": "Paris"}', None)
TIME_CALL = ("functions.get_time:1", "get_time", '{"zone": "Europe/Paris", "format": "24h"}', None)
LONG = HOLD_LIMIT  # a stretch of text exactly as long as a stream may hold back


def get_weather(city: str) -> str:
    """The weather now.

    Args:
        city: The city.
    """


def get_time(zone: str, format: str = "24h") -> str:
    """The time now.

    Args:
        zone: An IANA time zone.
        format: 12h or 24h.
    """


# The tool list of a request, as transformers writes it from Python functions (OpenAI's shape).
TOOLS = {"tools": [get_json_schema(get_weather), get_json_schema(get_time)]}
THINKING = {"in_reasoning": True}  # K2-Thinking: it thinks first, and may not write `<think>`

# name: (reply text, reasoning, content, calls as (id, name, arguments, None or a fragment of the error)[, options])
CASES = {
    "plain answer": ("The capital of France is Paris.", "", "The capital of France is Paris.", []),
    "think then answer": ("<think>The user asks for a capital.\nParis.</think>It is Paris.",
                          "The user asks for a capital.\nParis.", "It is Paris.", []),
    "tool call after think": ("<think>I need the weather.</think>Let me check." + SECTION.format(WEATHER),
                              "I need the weather.", "Let me check.", [WEATHER_CALL]),
    "two parallel tool calls": ("<think>Both.</think>" + SECTION.format(WEATHER + TIME), "Both.", "",
                                [WEATHER_CALL, TIME_CALL]),
    "tool call inside an unclosed think": ("<think>I should call the tool" + SECTION.format(WEATHER),
                                           "I should call the tool", "", [WEATHER_CALL]),
    "chinese and emoji": ("<think>用户在打招呼 🙂</think>你好！👋 有什么可以帮你？", "用户在打招呼 🙂", "你好！👋 有什么可以帮你？", []),
    "markers look-alikes stay text": ("a <thinking> b < /think> c <|tool", "", "a <thinking> b < /think> c <|tool", []),
    "unclosed think": ("<think>still going", "still going", "", []),
    # Text in a tool-call section outside any call comes back as content, closed section or not.
    "unclosed section keeps its text": ("Let me check." + SECTION_BEGIN + "I will look it up", "",
                                        "Let me check.I will look it up", []),
    "unclosed section after a call": (SECTION_BEGIN + WEATHER + "Anything else?", "", "Anything else?", [WEATHER_CALL]),
    "text between calls": (SECTION.format(WEATHER + "and " + TIME), "", "and ", [WEATHER_CALL, TIME_CALL]),
    "line breaks between markers are layout": (SECTION.format("\n" + WEATHER + "\n") + "\n" + SECTION_BEGIN + "\n",
                                               "", "\n", [WEATHER_CALL]),
    "section marker in time": (SECTION_BEGIN + "x" * LONG + WEATHER, "", "x" * LONG, [WEATHER_CALL]),
    "section marker too late: given up": (SECTION_BEGIN + "x" * LONG + "y" + WEATHER + SECTION_END, "",
                                          "x" * LONG + "y" + WEATHER + SECTION_END, []),
    "call id cut by the end of the reply": (SECTION_BEGIN + CALL_BEGIN + "functions.get_weather:0", "", "",
                                            [("functions.get_weather:0", "get_weather", "", "ended inside")]),
    "call id that never ends: given up": (SECTION_BEGIN + CALL_BEGIN + "functions.get_weather:0" + "z" * LONG, "",
                                          "functions.get_weather:0" + "z" * LONG, []),
    "long arguments stay one call": (SECTION.format(call("functions.write:0", json.dumps({"text": "w" * LONG}))), "",
                                     "", [("functions.write:0", "write", json.dumps({"text": "w" * LONG}), None)]),
    # A thinking model's reply that starts inside the think block (no <think>) is reasoning up to </think>.
    "reasoning without <think>": ("The user greets me.</think>Hello!", "The user greets me.", "Hello!", [], THINKING),
    "reasoning without <think>, then a call": ("I need the weather.</think>" + SECTION.format(WEATHER),
                                               "I need the weather.", "", [WEATHER_CALL], THINKING),
    "thinking cut off by the end": ("Hello! How can I", "Hello! How can I", "", [], THINKING),
    "long reasoning, then </think>": ("r" * 3 * LONG + "</think>ok", "r" * 3 * LONG, "ok", [], THINKING),
    "<think> again after the prompt's": ("<think>Thinking.</think>Answer.", "Thinking.", "Answer.", [],
                                         {"in_reasoning": True}),
    # Ids that do not say functions.NAME:INDEX: the request's tools name the function, or the call is flagged.
    "bare counter id": (SECTION.format(call("0", '{"city": "Paris"}')), "", "",
                        [("0", "get_weather", '{"city": "Paris"}', None)], TOOLS),
    "id without its index": (SECTION.format(call("functions.get_time", '{"zone": "UTC"}')), "", "",
                             [("functions.get_time", "get_time", '{"zone": "UTC"}', None)], TOOLS),
    "id without functions.": (SECTION.format(call("get_weather:2", "{}")), "", "",
                              [("get_weather:2", "get_weather", "{}", None)], TOOLS),
    "id naming no offered tool": (SECTION.format(call("functions.invalid.0", '{"city": "Paris"}')), "", "",
                                  [("functions.invalid.0", "invalid", '{"city": "Paris"}', "names no offered tool")],
                                  TOOLS),
    "bare counter fitting no tool": (SECTION.format(call("3", '{"q": 1}')), "", "",
                                     [("3", UNKNOWN_NAME, '{"q": 1}', "fit none of the offered tools")], TOOLS),
    "bare counter without tools": (SECTION.format(call("0", '{"city": "Paris"}')), "", "",
                                   [("0", UNKNOWN_NAME, '{"city": "Paris"}', "not functions.NAME:INDEX")]),
}


def _options(name: str) -> dict:
    return CASES[name][4] if len(CASES[name]) > 4 else {}


def _check(reply, reasoning, content, calls):
    assert reply.reasoning_content == reasoning
    assert reply.content == content
    assert [(c.id, c.name, c.arguments) for c in reply.tool_calls] == [call[:3] for call in calls]
    for c, (*_, error) in zip(reply.tool_calls, calls):
        assert c.error is None if error is None else error in c.error, c.error


@pytest.mark.parametrize("name", CASES)
def test_finished_reply(name):
    text, reasoning, content, calls = CASES[name][:4]
    _check(parse_reply(text, **_options(name)), reasoning, content, calls)


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


def _chunked(text: str, cuts: list[int], **options):
    parser = ReplyParser(**options)
    events = []
    for a, b in zip([0] + cuts, cuts + [len(text)]):
        events += parser.feed(text[a:b])
    events += parser.finish()
    return parser.reply, events


@pytest.mark.parametrize("name", CASES)
def test_streaming_split_at_every_boundary_equals_the_whole(name):
    text, options = CASES[name][0], _options(name)
    whole = parse_reply(text, **options)
    for cut in range(len(text) + 1):  # every two-piece split, markers cut anywhere
        reply, events = _chunked(text, [cut], **options)
        assert reply == whole, cut
        # The events alone rebuild the reply: what a streaming client shows is what the history stores.
        assert "".join(e.text for e in events if e.kind == "reasoning") == whole.reasoning_content
        assert "".join(e.text for e in events if e.kind == "content") == whole.content
        assert [e.tool_call for e in events if e.kind == "tool_call"] == whole.tool_calls
    assert _chunked(text, list(range(1, len(text))), **options)[0] == whole  # one character at a time


TOKEN_CASES = {
    "think, content, calls": ("<think>Weather first. 天气</think>Checking 🙂" + SECTION.format(WEATHER + TIME), {}),
    "no <think>, a bare counter id": ("Weather first. 天气</think>Checking 🙂" + SECTION.format(
        call("0", '{"city": "Paris"}') + TIME), THINKING | TOOLS),
}


@pytest.mark.parametrize("name", TOKEN_CASES)
def test_streaming_split_at_every_token_boundary(name, demo_dir):
    """Cut where the demo's K2 tokenizer cuts: special tokens arrive whole, text in BPE pieces."""
    from runtime.tokenizer import Tokenizer

    text, options = TOKEN_CASES[name]
    tokenizer = Tokenizer.from_folder(demo_dir)
    ids = tokenizer.encode_with_added(text)
    stream = tokenizer.stream()
    pieces = [stream.push(i) for i in ids] + [stream.finish()]
    assert "".join(pieces) == text
    cuts = [len("".join(pieces[:k])) for k in range(1, len(pieces))]
    whole = parse_reply(text, **options)
    assert _chunked(text, cuts, **options)[0] == whole
    assert whole.reasoning_content == "Weather first. 天气" and len(whole.tool_calls) == 2


@pytest.mark.parametrize("name", ["tool call after think", "two parallel tool calls", "bare counter id",
                                  "id without its index"])
def test_parsed_message_renders_back_through_the_template(name):
    """The parsed reply, stored as an OpenAI message, is what K2-Thinking's template (rendered by transformers)
    writes for the current turn: reasoning, content and the tool-call section, byte for byte; a malformed call id
    too, as the model wrote it, so the tool's result answers the id the model gave."""
    template = CHAT_TEMPLATE.read_text()
    reply_text = CASES[name][0]
    message = parse_reply(reply_text, **_options(name)).to_message()
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "weather?"}, message]
    rendered = render_jinja_template([messages], chat_template=template)[0][0]
    written = reply_text if reply_text.startswith("<think>") else "<think></think>" + reply_text
    assert rendered.endswith("<|im_assistant|>assistant<|im_middle|>" + written + "<|im_end|>")


def test_tool_call_message_shape():
    assert k2_tool_call("functions.a.b:3", "{}").to_message() == {
        "id": "functions.a.b:3", "type": "function", "function": {"name": "b", "arguments": "{}"}}


@pytest.mark.parametrize("prompt_end, thinking_model, expected", [
    ("<|im_assistant|>assistant<|im_middle|>", True, True),  # K2-Thinking: it thinks first, `<think>` or not
    ("<|im_assistant|>assistant<|im_middle|>", False, False),  # K2-Instruct: its template writes no `</think>`
    ("<|im_assistant|>assistant<|im_middle|><think>", False, True),  # the prompt opened the block
    ("<|im_assistant|>assistant<|im_middle|><think></think>\n", True, False),  # a thinking switch closed it
])
def test_where_a_k2_reply_starts(prompt_end, thinking_model, expected):
    assert REPLY_PARSERS["kimi_k2"].starts_in_reasoning(prompt_end, thinking_model) is expected
