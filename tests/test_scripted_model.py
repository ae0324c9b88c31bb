"""The scripted test model (tests/scripted_model.py): a real `k2 chat` process, a chat session and the engine play
its script through the real loader, tiktoken tokenizer, sampler and K2 reply parser, the cache semantics intact."""
import json
import os
import subprocess

import pytest

from runtime import engine as engine_module
from runtime.engine import Engine
from runtime.loader import load
from runtime.models import FAMILY_MODULES, register_family
from runtime.sampling import Sampler, SamplingParams
from runtime.session import ChatSession
from tests import scripted_k2

REASONING = "The user wants the weather, so I call the tool."
ARGUMENTS = '{"city": "Paris"}'
CALL_ID = "functions.get_weather:0"
ANSWER = "It is sunny in Paris, 21 °C."  # ° is two bytes: the stream decoder holds a split character back
REPLIES = [
    f"<think>{REASONING}</think><|tool_calls_section_begin|><|tool_call_begin|>{CALL_ID}"
    f"<|tool_call_argument_begin|>{ARGUMENTS}<|tool_call_end|><|tool_calls_section_end|>",
    f"<think>The tool answered.</think>{ANSWER}",
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def scripted_dir(tmp_path_factory, demo_dir):
    from tests.scripted_model import write_scripted

    return write_scripted(tmp_path_factory.mktemp("scripted") / "k2-scripted", REPLIES, tokenizer_from=demo_dir)


@pytest.fixture(scope="module")
def loaded(scripted_dir):
    register_family(scripted_k2.FAMILY_MODULE)
    return load(scripted_dir)


def _script_ids(loaded) -> list[list[int]]:
    """The script as the loaded model holds it, each reply without its end-of-turn padding."""
    end = loaded.config["eos_token_id"]
    return [[int(i) for i in row if i != end] for row in loaded.model.script.long()]


def test_registering_a_family_twice_changes_nothing(loaded):
    register_family(scripted_k2.FAMILY_MODULE)
    assert FAMILY_MODULES.count(scripted_k2.FAMILY_MODULE) == 1
    assert loaded.family.reply_format == "kimi_k2"


def test_k2_chat_process_returns_the_scripted_tool_call(scripted_dir, tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TOOLS))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"K2_HOME": str(tmp_path / "home")}
    result = subprocess.run(scripted_k2.command("chat", scripted_dir, "-p", USER[0]["content"], "--tools", tools,
                                                "--json"),
                            cwd=scripted_k2.ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    message = json.loads(result.stdout)["message"]
    assert message["reasoning_content"] == REASONING
    assert message["content"] == ""
    assert message["tool_calls"] == [{"id": CALL_ID, "type": "function",
                                      "function": {"name": "get_weather", "arguments": ARGUMENTS}}]


def test_chat_session_plays_the_script_turn_by_turn(loaded):
    tokenizer = loaded.tokenizer
    assert [tokenizer.decode(ids) for ids in _script_ids(loaded)] == REPLIES  # the real tokenizer's round trip
    engine = loaded.engine(1, 512)
    session = ChatSession(engine, tokenizer, loaded.template, loaded.chat_stop_ids(), loaded.reply_parser, tools=TOOLS)
    params = loaded.sampling(seed=0)  # the folder's sampling: temperature 1
    list(session.send(USER[0]["content"], params, 100))
    call = session.messages[-1]
    assert call["reasoning_content"] == REASONING and call["content"] == ""
    assert call["tool_calls"] == [{"id": CALL_ID, "type": "function",
                                   "function": {"name": "get_weather", "arguments": ARGUMENTS}}]
    assert session.turns[-1].stop == "end of turn"

    session.messages.append({"role": "tool", "tool_call_id": CALL_ID, "content": "sunny, 21 °C"})
    list(session.send("And so?", params, 100))
    assert session.messages[-1] == {"role": "assistant", "content": ANSWER, "reasoning_content": "The tool answered."}
    second = session.turns[-1]
    assert second.stop == "end of turn" and second.reused_tokens > 0
    assert second.new_tokens == len(_script_ids(loaded)[1]) + 1  # the reply and its end of turn


def _prompt(loaded, messages) -> list[int]:
    return loaded.template.encode(loaded.tokenizer, messages, TOOLS, add_generation_prompt=True)


def _expected(loaded, reply: int) -> list[int]:
    return loaded.tokenizer.encode_with_added(REPLIES[reply]) + [loaded.config["eos_token_id"]]


def _greedy(loaded):
    return Sampler(SamplingParams(temperature=0), loaded.args.vocab_size)


@pytest.mark.parametrize("decoder", ["eager", "static"])  # static: every step reads the whole cache row
def test_engine_start_after_a_truncate_matches_a_fresh_start(loaded, monkeypatch, decoder):
    first = _prompt(loaded, USER)
    second = _prompt(loaded, USER + [{"role": "assistant", "content": "", "tool_calls": [
        {"id": CALL_ID, "type": "function", "function": {"name": "get_weather", "arguments": ARGUMENTS}}]},
        {"role": "tool", "tool_call_id": CALL_ID, "content": "sunny"}])
    assert second[:len(first)] == first  # the first prompt opens the assistant turn the second one holds
    end = {loaded.config["eos_token_id"]}
    fresh = [list(loaded.engine(1, 512).stream(0, prompt, _greedy(loaded), 100, end)) for prompt in (first, second)]
    assert fresh == [_expected(loaded, 0), _expected(loaded, 1)]

    engine = Engine(loaded.model, 1, 512, decoder)
    monkeypatch.setattr(engine_module, "PREFILL_CHUNK", 5)  # a prompt prefilled in many chunks
    for keep in (len(first) - 1, 7):
        list(engine.stream(0, second, _greedy(loaded), 100, end))
        # Past `keep` the slot still holds the second prompt's tokens, its second <|im_assistant|> among them: the
        # model must read only what the slot keeps and what is prefilled over it.
        engine.truncate(0, keep)
        assert list(engine.stream(0, first, _greedy(loaded), 100, end, keep=keep)) == fresh[0]


@pytest.mark.parametrize("decoder", ["eager", "static"])
def test_two_slots_decode_their_own_replies_in_one_batch(loaded, decoder):
    engine = Engine(loaded.model, 2, 512, decoder)
    prompts = [_prompt(loaded, USER), _prompt(loaded, USER + [{"role": "assistant", "content": "Let me check."},
                                                               {"role": "user", "content": "Go on."}])]
    end = loaded.config["eos_token_id"]
    drawn = [[int(engine.start(slot, prompt, _greedy(loaded)))] for slot, prompt in enumerate(prompts)]
    while any(engine.samplers):
        ids = engine.step()
        for slot, tokens in enumerate(drawn):
            if engine.samplers[slot] is not None:
                tokens.append(int(ids[slot]))
                if tokens[-1] == end:
                    engine.finish(slot)  # the other slot decodes on alone, the free one masked out
    assert drawn == [_expected(loaded, 0), _expected(loaded, 1)]
