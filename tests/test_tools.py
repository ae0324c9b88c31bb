"""`k2 chat --tools FILE`: the tool list is checked against OpenAI's tool shape before anything is loaded. Good lists
are the ones transformers writes from Python functions (`get_json_schema`); a bad one fails with one line naming the
file, the entry and the field."""
import json

import pytest
from transformers.utils import get_json_schema
from transformers.utils.chat_template_utils import render_jinja_template

from runtime.tokenizer import Tokenizer
from runtime.tools import check_tools
from tests.helpers import assert_one_line_error, run_k2_here


def get_weather(city: str, unit: str = "celsius") -> str:
    """The weather now.

    Args:
        city: The city.
        unit: celsius or fahrenheit.
    """


def get_time(zone: str) -> str:
    """The time now.

    Args:
        zone: An IANA time zone.
    """


WEATHER, TIME = get_json_schema(get_weather), get_json_schema(get_time)


def test_tool_lists_transformers_writes_are_accepted():
    tools = check_tools([WEATHER, TIME])
    assert [tool.function.name for tool in tools] == ["get_weather", "get_time"]
    assert tools[0].function.parameters.accepts({"city": "Paris"})
    assert not tools[0].function.parameters.accepts({"unit": "celsius"})  # city is required
    assert not tools[1].function.parameters.accepts({"zone": "UTC", "city": "Paris"})  # city is not get_time's


def _function(**changes) -> dict:
    return {"type": "function", "function": {**WEATHER["function"], **changes}}


# The file's JSON, and what the error says after `--tools FILE: `.
BAD_LISTS = {
    "an object, not a list": (WEATHER, "tools: should be a JSON list"),
    "a number in the list": ([WEATHER, 3], "tools[1]: should be a JSON object"),
    "a name in the list": (["get_weather"], "tools[0]: should be a JSON object"),
    "no type": ([{"function": WEATHER["function"]}], "tools[0].type: is missing"),
    "not a function": ([{**WEATHER, "type": "retrieval"}], "tools[0].type: should be 'function', not 'retrieval'"),
    "no function": ([{"type": "function"}], "tools[0].function: is missing"),
    "no name": ([{"type": "function", "function": {"description": "d"}}], "tools[0].function.name: is missing"),
    "a number as name": ([TIME, _function(name=7)], "tools[1].function.name: should be a string"),
    "a space in the name": ([TIME, _function(name="get weather")],
                            "tools[1].function.name: 'get weather' is not a function name"),
    "a name too long": ([_function(name="f" * 65)], "tools[0].function.name: 'ffff"),
    "an empty name": ([_function(name="")], "tools[0].function.name: '' is not a function name"),
    "a list as description": ([_function(description=["d"])], "tools[0].function.description: should be a string"),
    "parameters not an object": ([_function(parameters="city")],
                                 "tools[0].function.parameters: should be a JSON object"),
    "parameters of a string": ([_function(parameters={"type": "string"})],
                               "tools[0].function.parameters.type: should be 'object', not 'string'"),
    "required not a list": ([_function(parameters={"type": "object", "required": "city"})],
                            "tools[0].function.parameters.required: should be a JSON list"),
    "a property not a schema": ([_function(parameters={"type": "object", "properties": {"city": "string"}})],
                                "tools[0].function.parameters.properties.city: should be a JSON object"),
    "two tools of one name": ([WEATHER, TIME, WEATHER],
                              "tools[2].function.name: 'get_weather' is already the name of tools[0]"),
}


@pytest.mark.parametrize("case", BAD_LISTS)
def test_bad_tool_list_fails_in_one_line_naming_entry_and_field(case, tmp_path):
    data, problem = BAD_LISTS[case]
    path = tmp_path / "tools.json"
    path.write_text(json.dumps(data))
    assert_one_line_error(run_k2_here("chat", "-p", "hi", "--tools", path, home=tmp_path), f"--tools {path}: {problem}")
    assert [p.name for p in tmp_path.iterdir()] == ["tools.json"]  # refused before the demo was even written


@pytest.mark.parametrize("content, problem", [(b"\xff\xfe\x00garbage", "is not valid JSON"),
                                              (b'[{"type": ', "is not valid JSON"),
                                              (b"[" * 100_000, "is nested too deeply"), (None, "not found")])
def test_tools_file_that_is_not_a_json_list(content, problem, tmp_path):
    path = tmp_path / "tools.json"
    if content is not None:
        path.write_bytes(content)
    assert_one_line_error(run_k2_here("chat", "-p", "hi", "--tools", path, home=tmp_path), f"--tools {path} {problem}")


def test_a_good_tool_list_reaches_the_template_as_written(demo_dir, tmp_path):
    """Unknown keys too (transformers writes `return`): the prompt is the template rendered by transformers with the
    file's list, token for token."""
    tools = [WEATHER, {**TIME, "x-note": "kept"}]
    path = tmp_path / "tools.json"
    path.write_text(json.dumps(tools))
    result = run_k2_here("chat", demo_dir, "-p", "Weather in Paris?", "--tools", path, "-n", "1", "--ctx", "1024",
                         "--json", home=tmp_path)
    assert result.returncode == 0, result.stderr
    rendered = render_jinja_template([[{"role": "user", "content": "Weather in Paris?"}]], tools=tools,
                                     chat_template=(demo_dir / "chat_template.jinja").read_text(),
                                     add_generation_prompt=True)[0][0]
    assert json.dumps(tools[1]["x-note"]) in rendered
    prompt_tokens = len(Tokenizer.from_folder(demo_dir).encode_with_added(rendered))
    assert json.loads(result.stdout)["stats"]["prompt_tokens"] == prompt_tokens
