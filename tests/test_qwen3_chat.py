"""Qwen3's chat: its own template (tests/data/qwen3.jinja) rendered and tokenized as transformers' apply_chat_template
does, its thinking switch, and its replies (`<think>` reasoning, Hermes `<tool_call>` blocks) parsed as transformers'
Qwen3 response parser parses them, finished or streamed however cut, and written back by the template as they came.
The tokenizer is Qwen3's set of markers over a byte-level vocabulary, built here, so that both sides run offline."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend
from transformers import PreTrainedTokenizerFast
from transformers.cli.serving.utils import _RESPONSE_TEMPLATE_FALLBACKS
from transformers.utils import get_json_schema
from transformers.utils.chat_parsing import parse_response

from runtime.chat_format import HOLD_LIMIT, REPLY_PARSERS, UNKNOWN_NAME, LlamaParser, Qwen3Parser, parse_reply
from runtime.chat_template import ChatTemplate
from runtime.sampling import SamplingParams
from runtime.session import ChatSession
from runtime.tokenizer import HFTokenizer

QWEN3_TEMPLATE = (Path(__file__).parent / "data" / "qwen3.jinja").read_text()
# transformers' own response template for the qwen3 model types (what `transformers serve` parses Qwen3 replies with).
QWEN3_RESPONSE = next(spec for types, spec in _RESPONSE_TEMPLATE_FALLBACKS.items() if "qwen3" in types)
SPECIAL, ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], ["<tool_call>", "</tool_call>", "<tool_response>",
                                                                   "</tool_response>", "<think>", "</think>"]


def get_weather(city: str) -> str:
    """The weather now.

    Args:
        city: The city.
    """


def get_time(zone: str) -> str:
    """The time now.

    Args:
        zone: An IANA time zone.
    """


TOOLS = [get_json_schema(get_weather), get_json_schema(get_time)]


@pytest.fixture(scope="module")
def tokenizers():
    """Ours and transformers' over one `tokenizers` backend: Qwen3's markers as Qwen3's tokenizer.json has them
    (`<think>` and `<tool_call>` added but not special), every other byte a token of its own."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Backend(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED])
    reference = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    reference.chat_template = QWEN3_TEMPLATE
    return HFTokenizer(backend), reference


def _reference_ids(reference, messages, tools=None, **kwargs) -> list[int]:
    return reference.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True,
                                         **kwargs)["input_ids"]


# Replies as Qwen3 writes them, in its template's layout.
WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TIME = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "Europe/Paris"}}\n</tool_call>'
WEATHER_CALL = ("call_0", "get_weather", '{"city": "Paris"}', None)
TIME_CALL = ("call_1", "get_time", '{"zone": "Europe/Paris"}', None)
LONG = HOLD_LIMIT
PROMPT_OPENED = {"in_reasoning": True}  # after a prompt ending with `<think>\n` (Qwen3-Thinking-2507's template)
OFFERED = {"tools": TOOLS}

# name: (reply, reasoning, content, calls as (id, name, arguments, None or a fragment of the error)[, options])
CASES = {
    "think then answer": ("<think>\nThe user greets me.\n</think>\n\nHello! 👋 你好", "The user greets me.",
                          "Hello! 👋 你好", []),
    "the empty think block of /no_think": ("<think>\n\n</think>\n\nParis.", "", "Paris.", []),
    "an answer without thinking": ("Paris is the capital.\n\nIt has 2 million people.", "",
                                   "Paris is the capital.\n\nIt has 2 million people.", []),
    "content, then two calls": ("<think>\nBoth.\n</think>\n\nLet me check.\n" + WEATHER + "\n" + TIME, "Both.",
                                "Let me check.", [WEATHER_CALL, TIME_CALL]),
    "calls only": ("<think>\nWeather.\n</think>\n\n" + WEATHER, "Weather.", "", [WEATHER_CALL]),
    "reasoning opened by the prompt": ("The user asks.\n</think>\n\nParis.", "The user asks.", "Paris.", [],
                                       PROMPT_OPENED),
    "<think> again after the prompt's": ("<think>\nThinking.\n</think>\n\nAnswer.", "Thinking.", "Answer.", [],
                                         PROMPT_OPENED),
    "unclosed think": ("<think>\nstill going\n", "still going", "", []),
    "a call inside an unclosed think": ("<think>\nI need the weather.\n" + WEATHER, "I need the weather.", "",
                                        [WEATHER_CALL]),
    "a call, no thinking": ("Let me check.\n" + WEATHER, "", "Let me check.", [WEATHER_CALL]),
    "text after the calls": ("Checking.\n" + WEATHER + "\nDone.", "", "Checking.\nDone.", [WEATHER_CALL]),
    "text between calls": (WEATHER + "\nand\n" + TIME, "", "and", [WEATHER_CALL, TIME_CALL]),
    "look-alikes stay text": ("a <thinking> b </tool_call> c < tool_call> d <tool", "",
                              "a <thinking> b </tool_call> c < tool_call> d <tool", []),
    "compact JSON kept as written": ('<tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>', "",
                                     "", [("call_0", "get_weather", '{"city":"Paris"}', None)]),
    "arguments in another layout": ('<tool_call>\n{"arguments": {"city": "東京"}, "name": "get_weather"}\n</tool_call>',
                                    "", "", [("call_0", "get_weather", '{"city": "東京"}', None)]),
    "long arguments stay one call": ('<tool_call>\n{"name": "write", "arguments": {"text": "' + "w" * LONG + '"}}\n'
                                     "</tool_call>", "", "", [("call_0", "write", json.dumps({"text": "w" * LONG}),
                                                               None)]),
    # Malformed calls: kept, flagged, the body as the model wrote it where it is not a call's JSON.
    "malformed JSON": ('<tool_call>\n{"name": "get_weather", "arguments": {"city": }}\n</tool_call>', "", "",
                       [("call_0", "get_weather", '{"name": "get_weather", "arguments": {"city": }}',
                         "not valid JSON")]),
    "not an object": ('<tool_call>\n["get_weather", {"city": "Paris"}]\n</tool_call>', "", "",
                      [("call_0", UNKNOWN_NAME, '["get_weather", {"city": "Paris"}]', '"name" string')]),
    "arguments as a string": ('<tool_call>\n{"name": "get_weather", "arguments": "Paris"}\n</tool_call>', "", "",
                              [("call_0", "get_weather", '{"name": "get_weather", "arguments": "Paris"}',
                                '"arguments" are not a JSON object')]),
    "no name": ('<tool_call>\n{"arguments": {"city": "Paris"}}\n</tool_call>', "", "",
                [("call_0", UNKNOWN_NAME, '{"arguments": {"city": "Paris"}}', '"name" string')]),
    "a name that is no function name": ('<tool_call>\n{"name": "get weather!", "arguments": {}}\n</tool_call>', "", "",
                                        [("call_0", "get weather!", "{}", "is not a function name")]),
    "a name no offered tool has": ('<tool_call>\n{"name": "get_news", "arguments": {"topic": "AI"}}\n</tool_call>',
                                   "", "", [("call_0", "get_news", '{"topic": "AI"}', "names no offered tool")],
                                   OFFERED),
    "an offered tool": (WEATHER, "", "", [WEATHER_CALL], OFFERED),
    "no </tool_call> before the next call": (WEATHER[:-len("</tool_call>")] + TIME, "", "",
                                             [("call_0", "get_weather", '{"city": "Paris"}', "no </tool_call>"),
                                              TIME_CALL]),
    "reply cut inside a call": ("Checking.\n" + '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',
                                "", "Checking.", [("call_0", "get_weather",
                                                   '{"name": "get_weather", "arguments": {"city": "Par',
                                                   "ended inside")]),
    "reply cut after <tool_call>": ("<tool_call>", "", "", [("call_0", UNKNOWN_NAME, "", "ended inside")]),
}
LLAMA_CASES = {
    "a <think> is text": ("<think>\nhm\n</think>\n\nHi!", "", "<think>\nhm\n</think>\n\nHi!", []),
    "calls and text": ("Checking.\n" + WEATHER + "\n" + TIME + "\nDone.", "", "Checking.\nDone.",
                       [WEATHER_CALL, TIME_CALL]),
    "reasoning the prompt opened is text too": ("hm\n</think>\n\nHi!", "", "hm\n</think>\n\nHi!", [], PROMPT_OPENED),
}
ALL = {("qwen3", name): case for name, case in CASES.items()} | {("llama", name): c for name, c in LLAMA_CASES.items()}


def _options(case) -> dict:
    return case[4] if len(case) > 4 else {}


def _check(reply, reasoning, content, calls):
    assert reply.reasoning_content == reasoning
    assert reply.content == content
    assert [(c.id, c.name, c.arguments) for c in reply.tool_calls] == [call[:3] for call in calls]
    for c, (*_, error) in zip(reply.tool_calls, calls):
        assert c.error is None if error is None else error in c.error, c.error


def _chunked(parser, text: str, cuts: list[int], **options):
    parser = parser(**options)
    events = []
    for a, b in zip([0] + cuts, cuts + [len(text)]):
        events += parser.feed(text[a:b])
    events += parser.finish()
    return parser.reply, events


@pytest.mark.parametrize("key", ALL, ids=" / ".join)
def test_finished_reply(key):
    case = ALL[key]
    _check(parse_reply(case[0], REPLY_PARSERS[key[0]], **_options(case)), *case[1:4])


@pytest.mark.parametrize("key", ALL, ids=" / ".join)
def test_streaming_split_at_every_boundary_equals_the_whole(key):
    parser, case = REPLY_PARSERS[key[0]], ALL[key]
    text, options = case[0], _options(case)
    whole = parse_reply(text, parser, **options)
    cuts = range(len(text) + 1) if len(text) < 2 * LONG else range(0, len(text) + 1, 97)
    for cut in cuts:  # every two-piece split, markers cut anywhere
        reply, events = _chunked(parser, text, [cut], **options)
        assert reply == whole, cut
        # The events alone rebuild the reply: what a streaming client shows is what the history stores.
        assert "".join(e.text for e in events if e.kind == "reasoning") == whole.reasoning_content
        assert "".join(e.text for e in events if e.kind == "content") == whole.content
        assert [e.tool_call for e in events if e.kind == "tool_call"] == whole.tool_calls
    assert _chunked(parser, text, list(range(1, len(text))), **options)[0] == whole  # one character at a time


def test_malformed_calls_are_never_dropped():
    text = "Checking.\n" + "\n".join([WEATHER, "<tool_call>\n{oops\n</tool_call>", TIME, "<tool_call>\n{\"name\": 3}"])
    reply = parse_reply(text, Qwen3Parser)
    assert [c.id for c in reply.tool_calls] == ["call_0", "call_1", "call_2", "call_3"]
    assert [c.error is None for c in reply.tool_calls] == [True, False, True, False]
    assert reply.tool_calls[1].arguments == "{oops" and reply.tool_calls[3].arguments == '{"name": 3}'
    with pytest.raises(json.JSONDecodeError):  # truly malformed, and still there to show the user
        json.loads(reply.tool_calls[1].arguments)


# Replies transformers' Qwen3 response parser takes as we do: reasoning, content before the calls, the calls.
REFERENCE_CASES = ["think then answer", "the empty think block of /no_think", "an answer without thinking",
                   "content, then two calls", "calls only", "arguments in another layout",
                   "long arguments stay one call"]


@pytest.mark.parametrize("name", REFERENCE_CASES)
def test_parse_equals_transformers_qwen3_response_parser(name):
    text = CASES[name][0]
    ours = parse_reply(text, Qwen3Parser)
    theirs = parse_response(text, QWEN3_RESPONSE, prefix="<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert ours.reasoning_content == theirs.get("reasoning_content", "")
    assert ours.content == theirs.get("content", "")
    assert [(c.name, json.loads(c.arguments)) for c in ours.tool_calls] == [
        (t["function"]["name"], t["function"]["arguments"]) for t in theirs.get("tool_calls", [])]


# The end of a prompt (the generation prompt of each kind of Qwen3 template) and a reply that follows it.
PROMPT_ENDS = {
    "thinking on": ("<|im_start|>assistant\n", "<think>\nHm.\n</think>\n\nHi."),
    "thinking switched off": ("<|im_start|>assistant\n<think>\n\n</think>\n\n", "Hi."),
    "Qwen3-2507-Instruct (never thinks)": ("<|im_start|>assistant\n", "Hi."),
    "Qwen3-Thinking-2507 (the prompt opens the block)": ("<|im_start|>assistant\n<think>\n", "Hm.\n</think>\n\nHi."),
}


@pytest.mark.parametrize("name", PROMPT_ENDS)
def test_where_the_reply_starts_follows_the_prompt_as_transformers_reads_it(name):
    """The model thinks in every case (the template writes `</think>`): the prompt alone says where its reply starts,
    as transformers' parser reads it from the prompt (its `prefix`)."""
    prompt_end, reply = PROMPT_ENDS[name]
    in_reasoning = Qwen3Parser.starts_in_reasoning(prompt_end, thinking_model=True)
    ours = parse_reply(reply, Qwen3Parser, in_reasoning=in_reasoning)
    theirs = parse_response(reply, QWEN3_RESPONSE, prefix="<|im_start|>user\nhi<|im_end|>\n" + prompt_end)
    assert (ours.reasoning_content, ours.content) == (theirs.get("reasoning_content", ""), theirs["content"])
    assert not LlamaParser.starts_in_reasoning(prompt_end, thinking_model=True)


def test_session_tells_the_parser_where_the_reply_starts(tokenizers):
    """The session's rule, on the tokens of Qwen3's rendered prompts, with thinking switched on and off, and in a
    prompt that opens the block. A reply with no `<think>` after a plain generation prompt is content: K2's rule (a
    thinking model may leave `<think>` out) would hold a Qwen3-2507-Instruct answer back as reasoning."""
    ours, reference = tokenizers
    chat = ChatSession(SimpleNamespace(max_len=4096), ours, ChatTemplate(QWEN3_TEMPLATE), set(), Qwen3Parser)
    tail = {}
    for thinking in (None, True, False):
        if thinking is not None:
            chat.set_thinking(thinking)
        tail[thinking] = ours.decode(chat.prompt_ids([{"role": "user", "content": "hi"}])[-4:])
    assert [Qwen3Parser.starts_in_reasoning(tail[t], True) for t in (None, True, False)] == [False, False, False]
    assert REPLY_PARSERS["kimi_k2"].starts_in_reasoning(tail[None], True)  # K2's rule, for contrast
    assert not REPLY_PARSERS["kimi_k2"].starts_in_reasoning(tail[False], True)
    assert Qwen3Parser.starts_in_reasoning(ours.decode(ours.encode_with_added("<|im_start|>assistant\n<think>\n")),
                                           True)


CONVERSATIONS = {
    "one message": [{"role": "user", "content": "Hello!"}],
    "/no_think in a message": [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "What is 2+2? /no_think"}],
    "/think in a message": [{"role": "user", "content": "Prove it. /think"}],
}


@pytest.mark.parametrize("thinking", [None, True, False], ids=["default", "on", "off"])
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_thinking_switch_renders_what_transformers_renders(tokenizers, name, thinking):
    """`k2 chat --think/--no-think` and `/think on|off` set the session's switch: its prompt is the one transformers'
    apply_chat_template(..., enable_thinking=...) makes, token for token."""
    ours, reference = tokenizers
    template = ChatTemplate(QWEN3_TEMPLATE)
    assert template.thinking_switch == "enable_thinking"
    chat = ChatSession(SimpleNamespace(max_len=4096), ours, template, set(), Qwen3Parser)
    chat.load(CONVERSATIONS[name])
    kwargs = {}
    if thinking is not None:
        chat.set_thinking(thinking)
        kwargs["enable_thinking"] = thinking
    assert chat.prompt_ids() == _reference_ids(reference, CONVERSATIONS[name], **kwargs)
    assert ours.decode(chat.prompt_ids()).endswith("<think>\n\n</think>\n\n") == (thinking is False)


def _turns(*replies):
    """A conversation whose assistant turns are our parse of what the model wrote: the history the session keeps."""
    messages = [{"role": "system", "content": "Use tools."}]
    for user, reply, results in replies:
        messages.append({"role": "user", "content": user})
        message = parse_reply(reply, Qwen3Parser, tools=TOOLS).to_message()
        messages.append(message)
        messages += [{"role": "tool", "tool_call_id": call["id"], "content": result}
                     for call, result in zip(message.get("tool_calls", []), results)]
    return messages


AGENT_TURN = ("Weather and time in Paris?", "<think>\nBoth tools.\n</think>\n\nChecking.\n" + WEATHER + "\n" + TIME,
              ["18 °C", "09:30"])
HISTORIES = {
    "tool calls and their results": _turns(AGENT_TURN),
    "a tool round, then its answer": _turns(AGENT_TURN) + [
        parse_reply("<think>\nReport it.\n</think>\n\nIt is 18 °C at 09:30.", Qwen3Parser).to_message()],
    "past reasoning, then a new question": _turns(AGENT_TURN) + [
        parse_reply("<think>\nReport it.\n</think>\n\nIt is 18 °C.", Qwen3Parser).to_message(),
        {"role": "user", "content": "And tomorrow? /no_think"}],
}


@pytest.mark.parametrize("thinking", [None, False], ids=["default", "off"])
@pytest.mark.parametrize("name", HISTORIES)
def test_history_renders_what_transformers_renders(tokenizers, name, thinking):
    """Parsed replies in the history (reasoning_content, tool calls, tool results) render as transformers renders
    them: reasoning after the last user message shown again, before it dropped."""
    ours, reference = tokenizers
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    messages = HISTORIES[name]
    assert ChatTemplate(QWEN3_TEMPLATE).encode(ours, messages, TOOLS, True, **kwargs) == _reference_ids(
        reference, messages, TOOLS, **kwargs)


@pytest.mark.parametrize("name, thinking", [
    ("think then answer", None), ("content, then two calls", None), ("calls only", None),
    ("the empty think block of /no_think", None), ("an answer without thinking", False), ("a call, no thinking", False),
])
def test_parsed_reply_renders_back_as_the_model_wrote_it(tokenizers, name, thinking):
    """The parsed reply, stored as an OpenAI message, is what Qwen3's template (rendered by transformers) writes for
    the turn: the prompt, then the reply byte for byte, so the next turn reuses every cached token. (With thinking
    off the prompt holds the empty think block, which the template writes for the answered turn too.)"""
    reply, kwargs = CASES[name][0], {} if thinking is None else {"enable_thinking": thinking}
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    prompt = ChatTemplate(QWEN3_TEMPLATE).render(messages, TOOLS, True, **kwargs)
    history = messages + [parse_reply(reply, Qwen3Parser, tools=TOOLS).to_message()]
    rendered = tokenizers[1].apply_chat_template(history, tools=TOOLS, tokenize=False, **kwargs)
    assert rendered == prompt + reply + "<|im_end|>\n"


class ScriptedEngine:
    """Stands in for the engine and writes `reply`: what runs is the session's own part of a turn (the prompt, where
    the reply starts, the parse, the history)."""

    def __init__(self, vocab_size: int):
        self.max_len, self.reply, self.prompts, self.cached = 4096, [], [], 0
        self.model = SimpleNamespace(args=SimpleNamespace(vocab_size=vocab_size), device="cpu")

    def truncate(self, slot, length):
        self.cached = length

    def length(self, slot):
        return self.cached

    def stream(self, slot, ids, sampler, budget, stop_ids, keep):
        self.prompts.append(ids)
        self.cached = len(ids)
        for token in self.reply:
            yield token
            self.cached += 1


@pytest.mark.parametrize("thinking", [None, False], ids=["default", "off"])
def test_a_qwen3_turn_through_the_session(tokenizers, thinking):
    """A reply with reasoning (or, thinking off, the answer alone) and two calls, then the tool results and the
    answer: each message as our parse gives it, each prompt the one transformers makes of the history."""
    ours, reference = tokenizers
    engine = ScriptedEngine(len(ours.special_tokens) + 256)
    chat = ChatSession(engine, ours, ChatTemplate(QWEN3_TEMPLATE), {ours.special_tokens["<|im_end|>"]}, Qwen3Parser,
                       system="Use tools.", tools=TOOLS)
    kwargs = {}
    if thinking is not None:
        chat.set_thinking(thinking)
        kwargs["enable_thinking"] = thinking
    first = AGENT_TURN[1] if thinking is None else AGENT_TURN[1].split("\n\n", 1)[1]
    for user, reply in (("Weather and time in Paris?", first), ("Thanks!", "You are welcome.")):
        engine.reply = ours.encode_with_added(reply)
        events = list(chat.send(user, SamplingParams(temperature=0), 64))
        assert engine.prompts[-1] == _reference_ids(reference, chat.messages[:-1], TOOLS, **kwargs)
        assert chat.messages[-1] == parse_reply(reply, Qwen3Parser, tools=TOOLS).to_message()
        assert "".join(e.text for e in events if e.kind == "content") == chat.messages[-1]["content"]
        if user.startswith("Weather"):
            chat.messages += [{"role": "tool", "tool_call_id": call["id"], "content": result}
                              for call, result in zip(chat.messages[-1]["tool_calls"], AGENT_TURN[2])]
    assert chat.messages[2].get("reasoning_content") == ("Both tools." if thinking is None else None)
    assert [c["function"]["name"] for c in chat.messages[2]["tool_calls"]] == ["get_weather", "get_time"]
