"""Chat templates rendered as transformers renders them (its own render_jinja_template is the oracle), on the demo's
template (K2-Thinking's real one) and on Qwen3's ChatML template with hybrid thinking, copied below."""
import json
from datetime import datetime

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from runtime.chat_template import ChatTemplate
from runtime.errors import K2Error
from runtime.models.deepseek_v3_demo import CHAT_TEMPLATE
from runtime.tokenizer import Tokenizer

K2_TEMPLATE = CHAT_TEMPLATE.read_text()
QWEN3_TEMPLATE = r'''{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}'''

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city, in °C",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "城市名"}},
                   "required": ["city"]}}}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "description": "Local time",
                                              "parameters": {"type": "object", "properties": {}}}}


def _call(i: int, name: str, arguments):
    return {"id": f"functions.{name}:{i}", "type": "function", "function": {"name": name, "arguments": arguments}}


# (messages, tools, add_generation_prompt, template kwargs)
CONVERSATIONS = {
    "one user message": ([{"role": "user", "content": "Hello!"}], None, True, {}),
    "system prompt": ([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}], None, True, {}),
    "multi-turn": ([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello! How can I help?"},
                    {"role": "user", "content": "Tell me a joke."}], None, True, {}),
    "no generation prompt": ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey."}], None, False, {}),
    "reasoning in history is dropped, current kept": (
        [{"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4", "reasoning_content": "Two plus two is four."},
         {"role": "user", "content": "and 3+3?"},
         {"role": "assistant", "content": "6", "reasoning_content": "Three plus three."}], None, False, {}),
    "tools declared": ([{"role": "user", "content": "Weather in Paris?"}], [WEATHER_TOOL, TIME_TOOL], True, {}),
    "tool call and result": (
        [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather in Paris?"},
         {"role": "assistant", "content": "", "reasoning_content": "I should call the tool.",
          "tool_calls": [_call(0, "get_weather", '{"city": "Paris"}')]},
         {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "18 °C, sunny"}],
        [WEATHER_TOOL], True, {}),
    "parallel calls with dict arguments": (
        [{"role": "user", "content": "Weather and time in 東京?"},
         {"role": "assistant", "content": "Checking both.",
          "tool_calls": [_call(0, "get_weather", {"city": "東京"}), _call(1, "get_time", {})]},
         {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "21 °C"},
         {"role": "tool", "tool_call_id": "functions.get_time:1", "content": "09:30"}],
        [WEATHER_TOOL, TIME_TOOL], True, {}),
    "agentic turn then a new question": (
        [{"role": "user", "content": "Weather?"},
         {"role": "assistant", "content": "", "reasoning_content": "call it",
          "tool_calls": [_call(0, "get_weather", '{"city": "Oslo"}')]},
         {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "-3 °C"},
         {"role": "assistant", "content": "It is -3 °C in Oslo.", "reasoning_content": "report it"},
         {"role": "user", "content": "Thanks! 🙂 And tomorrow?"}], [WEATHER_TOOL], True, {}),
    "unicode, markup and whitespace": (
        [{"role": "system", "content": "  leading and trailing  \n"},
         {"role": "user", "content": "<b>bold</b> {{ not jinja }} {% raw %} 你好 👩‍👩‍👧\n\n\tcode()"}], None, True, {}),
    "thinking switched off": ([{"role": "user", "content": "Quick answer please."}], None, True,
                              {"enable_thinking": False}),
    "thinking switched on": ([{"role": "user", "content": "Think hard."}], None, True, {"enable_thinking": True}),
    "None values are dropped": ([{"role": "user", "content": "Hi", "name": None},
                                 {"role": "assistant", "content": "Hello", "tool_calls": None,
                                  "reasoning_content": None}], None, False, {}),
}
TEMPLATES = {"k2-thinking": K2_TEMPLATE, "qwen3": QWEN3_TEMPLATE}


def _transformers_render(source: str, messages, tools, add_generation_prompt, kwargs) -> str:
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]  # as apply_chat_template does
    return render_jinja_template([messages], tools=tools, chat_template=source,
                                 add_generation_prompt=add_generation_prompt, **kwargs)[0][0]


@pytest.mark.parametrize("template_name", TEMPLATES)
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_render_equals_transformers(template_name, name):
    source = TEMPLATES[template_name]
    messages, tools, add_generation_prompt, kwargs = CONVERSATIONS[name]
    ours = ChatTemplate(source).render(messages, tools, add_generation_prompt, **kwargs)
    assert ours == _transformers_render(source, messages, tools, add_generation_prompt, kwargs)


def test_renders_hold_what_they_should():
    """Beyond agreeing with transformers, the renders are the formats of KIMI_K2.md §4."""
    k2, qwen = ChatTemplate(K2_TEMPLATE), ChatTemplate(QWEN3_TEMPLATE)
    messages, tools, _, _ = CONVERSATIONS["tool call and result"]
    text = k2.render(messages, tools, True)
    assert text.startswith("<|im_system|>tool_declare<|im_middle|>[")
    assert ("<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
            '{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>') in text
    assert "## Return of functions.get_weather:0\n18 °C, sunny<|im_end|>" in text
    assert text.endswith("<|im_assistant|>assistant<|im_middle|>")
    assert "城市名" in text  # tojson keeps non-ASCII as is
    history = k2.render(*CONVERSATIONS["reasoning in history is dropped, current kept"][:3])
    assert "<think></think>4<|im_end|>" in history and "<think></think>6<|im_end|>" in history  # answered turns
    assert "<think>I should call the tool.</think><|tool_calls_section_begin|>" in text  # the open agentic turn
    assert k2.render([{"role": "user", "content": "x"}]).startswith(
        "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>")
    assert qwen.render([{"role": "user", "content": "x"}], None, True, enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert qwen.thinking_switch == "enable_thinking" and k2.thinking_switch is None


def test_template_from_folder(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": QWEN3_TEMPLATE, "bos_token": "<s>"}))
    template = ChatTemplate.from_folder(tmp_path)
    assert template.source == QWEN3_TEMPLATE and template.special_tokens == {"bos_token": "<s>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "x"}, {"name": "default", "template": K2_TEMPLATE}]}))
    assert ChatTemplate.from_folder(tmp_path).source == K2_TEMPLATE
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}{{ messages[0]['content'] }}")
    assert ChatTemplate.from_folder(tmp_path).render([{"role": "user", "content": "hi"}]) == "hi"  # file wins
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(K2Error, match="no chat template"):
        ChatTemplate.from_folder(tmp_path)


def test_special_tokens_and_helpers_reach_the_template():
    source = ("{{ bos_token }}{{ messages | tojson(indent=1) }}|{{ strftime_now('%Y') }}|"
              "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}")
    messages = [{"role": "user", "content": "é"}, {"role": "user", "content": "two"}]
    ours = ChatTemplate(source, {"bos_token": "<s>"}).render(messages)
    assert ours == _transformers_render(source, messages, None, False, {"bos_token": "<s>"})
    assert ours.startswith('<s>[\n {\n  "role": "user",\n  "content": "é"') and f"|{datetime.now():%Y}|é" in ours


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__init__.__globals__['os'] }}",
    "{% set ns = namespace(_secret=1) %}{{ ns._secret }}",
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
    "{{ messages.append({'role': 'user'}) }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
])
def test_sandbox_holds(source):
    with pytest.raises(K2Error, match="sandbox forbids|template"):
        ChatTemplate(source).render([{"role": "user", "content": "hi"}])


def test_sandbox_hides_internals_it_does_not_refuse():
    # An unsafe attribute reads as undefined: it prints as nothing and leaks nothing.
    assert ChatTemplate("[{{ raise_exception.__globals__ }}{{ strftime_now.__code__ }}]").render([]) == "[]"


def test_template_errors_are_one_line_k2_errors():
    with pytest.raises(K2Error, match="refused the conversation: roles must alternate"):
        ChatTemplate("{{ raise_exception('roles must alternate') }}").render([])
    with pytest.raises(K2Error, match="syntax error at line 1"):
        ChatTemplate("{% if %}")


def test_end_of_turn_token(demo_dir, tmp_path):
    tokenizer = Tokenizer.from_folder(demo_dir)
    assert ChatTemplate(K2_TEMPLATE).end_of_turn(tokenizer) == tokenizer.special_tokens["<|im_end|>"]
    # Qwen3's template on a tokenizer that knows its markers (K2's reserved ids renamed to ChatML's).
    config = json.loads((demo_dir / "tokenizer_config.json").read_text())
    first = min(int(i) for i in config["added_tokens_decoder"])
    for offset, text in ((30, "<|im_start|>"), (31, "<|endoftext|>")):
        config["added_tokens_decoder"][str(first + offset)]["content"] = text
    (tmp_path / "tiktoken.model").symlink_to(demo_dir / "tiktoken.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    chatml = Tokenizer.from_folder(tmp_path)
    assert ChatTemplate(QWEN3_TEMPLATE).end_of_turn(chatml) == chatml.special_tokens["<|im_end|>"]
    ids = ChatTemplate(QWEN3_TEMPLATE).encode(chatml, [{"role": "user", "content": "<|im_start|>system"}], None, True)
    assert ids.count(chatml.special_tokens["<|im_start|>"]) == 2  # the user's own spelling stayed text
