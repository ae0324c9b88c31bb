"""The chat session and `k2 chat`: a cache that persists across turns (checked against a from-scratch prefill of the
whole conversation), trimming to the context, interruptions, and the real command driven through a pseudo-terminal."""
import json
import os
import sys

import pexpect
import pytest
import torch

from runtime.chat_format import ReplyParser
from runtime.chat_template import ChatTemplate
from runtime.engine import Engine
from runtime.errors import K2Error
from runtime.loader import load
from runtime.loading import load_model
from runtime.sampling import SamplingParams
from runtime.session import ChatSession, Notice
from runtime.tokenizer import Tokenizer
from tests.helpers import assert_one_line_error, run_k2_here
from tests.test_chat_template import QWEN3_TEMPLATE

GREEDY = SamplingParams(temperature=0)
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


class RecordingModel:
    """The model, with every forward call recorded: the tokens it was given, where they went in the cache, the
    logits. Optionally raises KeyboardInterrupt at call `interrupt_at`, as Ctrl-C does in the middle of compute."""

    def __init__(self, model):
        self.model, self.args, self.device = model, model.args, model.device
        self.calls, self.interrupt_at = [], None
        self.banned = None  # ids the sampler never sees as possible (their logits become -inf after recording)

    def new_cache(self, *args, **kwargs):
        return self.model.new_cache(*args, **kwargs)

    def __call__(self, tokens, cache, positions=None, last_only=False):
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            self.interrupt_at = None
            raise KeyboardInterrupt
        start = int(cache.lengths[0] if positions is None else positions[0])
        logits = self.model(tokens, cache, positions=positions, last_only=last_only)
        self.calls.append((tokens[0].tolist(), start, logits[0, -1].clone()))
        if self.banned is not None:
            logits[..., self.banned] = float("-inf")
        return logits


@pytest.fixture(scope="module")
def demo(demo_dir):
    return (load_model(demo_dir, dtype=torch.float32), Tokenizer.from_folder(demo_dir),
            ChatTemplate.from_folder(demo_dir))


def _session(demo, demo_dir, max_context=512, template=None, tokenizer=None, system="Be brief."):
    model, k2_tokenizer, k2_template = demo
    tokenizer, template = tokenizer or k2_tokenizer, template or k2_template
    stops = load(demo_dir, weights=False).eos_ids | {template.end_of_turn(tokenizer)}
    recorder = RecordingModel(model)
    # The fixed-shape decode step of the CUDA graph decoder, uncaptured: the chat runs on what a GPU would run.
    engine = Engine(recorder, 1, max_context, decoder="static")
    return ChatSession(engine, tokenizer, template, stops, ReplyParser, system=system), recorder


def _from_scratch(model, ids):
    with torch.inference_mode():
        return model(torch.tensor([ids]), model.new_cache(1, len(ids)), last_only=True)[0, -1]


def _turn(session, text, max_new_tokens=4, params=GREEDY):
    return list(session.send(text, params, max_new_tokens))


def test_second_turn_prefills_only_new_tokens_and_matches_a_fresh_prefill(demo, demo_dir):
    """K2-Thinking's template writes past assistant turns as `<think></think>answer`, so turn 2 computes exactly what
    follows turn 1's prompt: the assistant turn as the template writes it, the new message, the generation prompt."""
    session, recorder = _session(demo, demo_dir)
    _turn(session, "Hello there")
    prompt1 = recorder.calls[0][0]
    assert prompt1 == session.template.encode(session.tokenizer, session.messages[:-1], None, True)
    mark = len(recorder.calls)
    _turn(session, "And what is 你好?")
    prompt2 = session.template.encode(session.tokenizer, session.messages[:-1], None, True)
    tokens, start, logits = recorder.calls[mark]
    assert start == len(prompt1) and tokens == prompt2[len(prompt1):]
    assert len(tokens) == len(prompt2) - len(prompt1) == session.turns[-1].prefilled_tokens
    assert session.turns[-1].reused_tokens == len(prompt1)
    torch.testing.assert_close(logits, _from_scratch(demo[0], prompt2), rtol=1e-4, atol=1e-4)


def test_reply_tokens_stay_in_the_cache_when_the_template_keeps_them(demo, demo_dir, tmp_path):
    """With a ChatML template the history repeats the reply as it was generated, so turn 2 reuses it too and
    prefills only the end of the reply's turn and the new message."""
    config = json.loads((demo_dir / "tokenizer_config.json").read_text())
    first = min(map(int, config["added_tokens_decoder"]))
    config["added_tokens_decoder"][str(first + 30)]["content"] = "<|im_start|>"
    (tmp_path / "tiktoken.model").symlink_to(demo_dir / "tiktoken.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = Tokenizer.from_folder(tmp_path)
    session, recorder = _session(demo, demo_dir, template=ChatTemplate(CHATML), tokenizer=tokenizer)
    # Random weights like special tokens, whose text re-encodes as plain text: keep this reply to ordinary tokens.
    recorder.banned = sorted(tokenizer.special_tokens.values())
    _turn(session, "Hello there", max_new_tokens=6)
    prompt1 = recorder.calls[0][0]
    reply = [call[0][0] for call in recorder.calls[1:]]  # each decode step fed one generated id
    assert tokenizer.encode(session.messages[-1]["content"])[:len(reply)] == reply  # the reply re-encodes as generated
    mark = len(recorder.calls)
    _turn(session, "Next question")
    prompt2 = session.template.encode(tokenizer, session.messages[:-1], None, True)
    tokens, start, logits = recorder.calls[mark]
    assert start == len(prompt1) + len(reply)  # all of turn 1 that was fed, the reply included
    assert tokens == prompt2[start:] and len(tokens) < len(prompt2) - len(prompt1)
    torch.testing.assert_close(logits, _from_scratch(demo[0], prompt2), rtol=1e-4, atol=1e-4)


def test_edited_history_is_prefilled_again_from_the_first_difference(demo, demo_dir):
    session, recorder = _session(demo, demo_dir)
    _turn(session, "Hello there")
    _turn(session, "Second message")
    session.messages[1]["content"] = "Hello THERE"  # the first user message, edited
    mark = len(recorder.calls)
    _turn(session, "Third")
    prompt3 = session.template.encode(session.tokenizer, session.messages[:-1], None, True)
    tokens, start, logits = recorder.calls[mark]
    unchanged = session.template.encode(session.tokenizer, session.messages[:1], None, False)  # the system turn
    assert len(unchanged) < start < len(recorder.calls[0][0]) and tokens == prompt3[start:]
    torch.testing.assert_close(logits, _from_scratch(demo[0], prompt3), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("where", ["closed by the caller", "ctrl-c in decode", "ctrl-c in prefill"])
def test_an_interrupted_reply_leaves_a_consistent_session(demo, demo_dir, where):
    session, recorder = _session(demo, demo_dir)
    _turn(session, "Hello there")
    before = list(session.messages)
    turn = session.send("Tell me a long story", SamplingParams(temperature=1.0, seed=0), 200)
    if where == "closed by the caller":
        for _, _ in zip(range(3), turn):
            pass
        turn.close()
    else:
        recorder.interrupt_at = len(recorder.calls) + (3 if where == "ctrl-c in decode" else 0)
        with pytest.raises(KeyboardInterrupt):
            list(turn)
    assert session.turns[-1].stop == "interrupted"
    if where == "ctrl-c in prefill":
        assert session.messages == before  # nothing was said: the turn did not happen
    else:
        assert session.messages[-1]["role"] == "assistant" and session.turns[-1].new_tokens >= 3
    assert session.engine.length(0) == len(session.cache_ids)
    mark = len(recorder.calls)
    _turn(session, "Go on")
    prompt = session.template.encode(session.tokenizer, session.messages[:-1], None, True)
    tokens, start, logits = recorder.calls[mark]
    assert tokens == prompt[start:]
    torch.testing.assert_close(logits, _from_scratch(demo[0], prompt), rtol=1e-4, atol=1e-4)


def test_overflowing_context_drops_oldest_turns_but_keeps_the_system_prompt(demo, demo_dir):
    session, recorder = _session(demo, demo_dir, max_context=110, system="You are a terse assistant.")
    notices = []
    for i in range(5):
        events = _turn(session, f"Question number {i}: what is {i} plus {i}?", 3)
        notices += [e for e in events if isinstance(e, Notice)]
        prompt = session.template.encode(session.tokenizer, session.messages[:-1], None, True)
        assert len(prompt) + 3 <= 110
    assert notices and "dropped the 2 oldest message(s), kept the system prompt" in notices[0].text
    assert session.messages[0] == {"role": "system", "content": "You are a terse assistant."}
    assert session.messages[1]["role"] == "user" and "Question number 0" not in session.messages[1]["content"]
    with pytest.raises(K2Error, match="context holds 110"):
        _turn(session, "word " * 200)
    assert session.messages[-2]["content"].startswith("Question number 4")  # the long message was not kept


def test_thinking_switch_reaches_the_template(demo, demo_dir):
    session, _ = _session(demo, demo_dir)
    with pytest.raises(K2Error, match="no thinking switch"):  # K2-Thinking always thinks
        session.set_thinking(False)
    qwen, _ = _session(demo, demo_dir, template=ChatTemplate(QWEN3_TEMPLATE))
    qwen.messages.append({"role": "user", "content": "hi"})
    assert not qwen.tokenizer.decode(qwen.prompt_ids()).endswith("</think>\n\n")
    qwen.set_thinking(False)
    assert qwen.tokenizer.decode(qwen.prompt_ids()).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


class ScriptedModel(RecordingModel):
    """The model, made to write `script`: each forward's last logits put every token but the next one at -inf."""

    def __init__(self, model, script: list[int]):
        super().__init__(model)
        self.script = list(script)

    def __call__(self, tokens, cache, positions=None, last_only=False):
        logits = super().__call__(tokens, cache, positions, last_only)
        forced = torch.full_like(logits[..., -1, :], float("-inf"))
        forced[..., self.script.pop(0)] = 0.0
        logits[..., -1, :] = forced
        return logits


@pytest.mark.parametrize("thinking", [True, False], ids=["thinking-template", "qwen3-no-think"])
def test_a_reply_the_session_parses_with_the_request_s_tools_and_where_the_prompt_left_it(demo, demo_dir, thinking):
    """The reply starts inside the think block without writing `<think>` and calls a tool by a bare counter id:
    the session gives the parser the request's tools and where the prompt left the reply. After Qwen3's template
    closed the think block (thinking off), the same text is content, never held back as reasoning."""
    model, tokenizer, template = demo
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    reply = ('Paris, then.</think><|tool_calls_section_begin|><|tool_call_begin|>0<|tool_call_argument_begin|>'
             '{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>')
    stops = load(demo_dir, weights=False).eos_ids
    script = tokenizer.encode_with_added(reply) + [min(stops)]
    template = template if thinking else ChatTemplate(QWEN3_TEMPLATE)
    engine = Engine(ScriptedModel(model, script), 1, 512, decoder="eager")
    session = ChatSession(engine, tokenizer, template, stops, ReplyParser, tools=tools)
    if not thinking:
        session.set_thinking(False)
    list(session.send("Weather in Paris?", GREEDY, 64))
    message = session.messages[-1]
    assert [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] \
        == [("0", "get_weather", {"city": "Paris"})]
    if thinking:
        assert message["reasoning_content"] == "Paris, then." and not message["content"]
    else:
        assert message["content"] == "Paris, then.</think>" and "reasoning_content" not in message


# The real command ----------------------------------------------------------------------------------------------------

def test_k2_chat_in_a_terminal(demo_dir, tmp_path):
    """Two turns, /save, /reset, /load, a reply stopped by Ctrl-C, /exit: in a pseudo-terminal, as a person types."""
    env = dict(os.environ, K2_HOME=str(tmp_path / "home"), TERM="dumb")
    child = pexpect.spawn(sys.executable, ["-m", "k2cli", "chat", str(demo_dir), "-n", "5", "--seed", "1",
                                           "--ctx", "4096"], env=env, encoding="utf-8", timeout=120)
    try:
        child.expect("/help for commands")
        for message in ("Hello there", "What is 2+2?"):
            child.expect("> ")
            child.sendline(message)
            child.expect(r"\d+ new, first token [\d.]+ s, decode [\d.-]+ tok/s, stop: [a-z ]+\]")
        saved = tmp_path / "conversation.json"
        for command, answer in ((f"/save {saved}", "saved 4 messages"), ("/reset", "conversation cleared"),
                                ("/stats", "0 messages"), (f"/load {saved}", "loaded 4 messages"),
                                ("/stats", "4 messages"), ("/set max-tokens 100000", "max-tokens = 100000")):
            child.expect("> ")
            child.sendline(command)
            child.expect(answer)
        child.expect("> ")
        child.sendline("Now tell me a very long story")
        child.expect("story\r\n")  # the terminal's echo of the line; the reply follows
        # The reply has visibly begun: three letters in a row (the escape sequences readline prints as it hands the
        # line over have none; a Ctrl-C that early reaches readline, not the reply).
        child.expect(r"[a-z]{3}")
        child.sendintr()
        child.expect(r"\[stopped\]")
        child.expect(r"stop: interrupted\]")
        child.expect("> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    messages = json.loads(saved.read_text())
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    # The demo thinks first (K2-Thinking's template) and its random weights never close the think block.
    assert messages[2]["content"] == "What is 2+2?" and messages[1]["reasoning_content"]


def test_k2_chat_for_scripts(demo_dir):
    result = run_k2_here("chat", demo_dir, "-p", "What is the capital of France?", "-n", "6", "--seed", "2")
    assert result.returncode == 0, result.stderr
    # The reply is gibberish (random weights) that never closes the think block the demo opens with (K2-Thinking's
    # template): all reasoning, which goes to stderr when answering once, the stats line after it.
    assert not result.stdout.strip()
    assert "6 new" in result.stderr and "stop: max tokens" in result.stderr
    assert len(result.stderr) > len(result.stderr.strip().splitlines()[-1]) + 1  # reasoning before the stats
    piped = run_k2_here("chat", demo_dir, "-n", "6", "--json", "--temperature", "0", input="What is 2+2?\n")
    assert piped.returncode == 0, piped.stderr
    answer = json.loads(piped.stdout)
    assert answer["message"]["role"] == "assistant" and answer["stats"]["new_tokens"] <= 6
    assert answer["message"]["reasoning_content"]
    assert_one_line_error(run_k2_here("chat", demo_dir, "-p", "hi", "--no-think"), "no thinking switch")


@pytest.mark.parametrize("prompt", ["", " \n\t "])
def test_k2_chat_refuses_an_empty_message(prompt, tmp_path):
    """As the interactive prompt refuses an empty line and piped input refuses an empty stdin: no empty user turn."""
    assert_one_line_error(run_k2_here("chat", "-p", prompt, home=tmp_path), "-p/--prompt is empty")
    assert list(tmp_path.iterdir()) == []  # refused before the demo model was even written
