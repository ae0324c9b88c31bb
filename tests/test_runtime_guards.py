"""Run-time guards against silent wrong answers: logits that are not finite stop a request with one error line
(never token 0 forever), and no request runs past the positions the model was built for."""
import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from runtime.engine import Engine
from runtime.errors import K2Error
from runtime.loader import load
from runtime.loading import load_model
from runtime.sampling import NON_FINITE, Sampler, SamplingParams
from runtime.session import ChatSession
from tests.helpers import assert_one_line_error, copy_checkpoint, edit_json, generate, run_k2_here

VOCAB = 1000
GREEDY = SamplingParams(temperature=0)
SAMPLED = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.01, repetition_penalty=1.2, seed=3)
NON_FINITE_MESSAGE = "non-finite logits (NaN/inf) at token"
NON_FINITE_PATTERN = re.escape(NON_FINITE_MESSAGE)


# The sampler -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_a_row_with_a_non_finite_logit_draws_the_sentinel_and_leaves_the_other_rows_alone(bad, params):
    clean = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(0))
    poisoned = clean.clone()
    poisoned[1, 17] = bad
    suppressed = [7, 8]  # -inf on purpose: that is no bad row

    def draw(logits):
        sampler = Sampler(params, VOCAB, batch=2, suppress_ids=suppressed)
        sampler.observe(torch.tensor([[3, 17, 40], [3, 17, 40]]))
        return sampler(logits).tolist()

    good = draw(clean)[0]  # the same seed draws the same random numbers for row 0
    assert draw(poisoned) == [good, NON_FINITE]
    if params.greedy:
        assert good == int(clean[0].index_fill(0, torch.tensor(suppressed), -float("inf")).argmax())


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_minus_inf_masks_a_token_but_a_row_of_only_nan_or_minus_inf_has_no_token(params):
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(1))
    top = int(logits[0].argmax())
    logits[0, top] = -float("inf")  # masked, as logits processors do: the row draws another token
    logits[1], logits[2] = float("nan"), -float("inf")
    ids = Sampler(params, VOCAB, batch=3)(logits).tolist()
    assert ids[1:] == [NON_FINITE, NON_FINITE] and ids[0] not in (top, NON_FINITE)
    if params.greedy:
        assert ids[0] == int(logits[0].argmax())


# The engine and the chat session ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_model(demo_dir, one_thread):
    return load_model(demo_dir, dtype=torch.float32)


@pytest.fixture
def poison(demo_model):
    """poison(tensor, index, value): set one weight of the module's demo model, for this test only."""
    saved = []

    def set_weight(tensor, index, value):
        saved.append((tensor, index, tensor.data[index].clone()))
        tensor.data[index] = value
    yield set_weight
    for tensor, index, value in reversed(saved):
        tensor.data[index] = value


@pytest.mark.parametrize("decoder", ["eager", "static"])
def test_nan_weights_stop_the_stream_at_its_first_token(demo_model, poison, decoder):
    poison(demo_model.model.norm.weight, 0, float("nan"))
    engine = Engine(demo_model, 1, 16, decoder)
    with pytest.raises(K2Error, match=rf"{NON_FINITE_PATTERN} 1: .* try --dtype float32"):
        list(engine.stream(0, [5, 6, 7], Sampler.greedy(demo_model.args.vocab_size), 4))
    assert engine.samplers == [None]  # the slot is free again
    # Stepping on is safe (the sentinel is never fed to the embedding) and keeps saying so.
    assert generate(demo_model, [[5, 6, 7]], 3, decoder=decoder) == [[NON_FINITE] * 3]


@pytest.mark.parametrize("decoder", ["eager", "static"])
def test_a_token_with_a_broken_embedding_stops_only_its_row_and_says_which_token(demo_model, poison, decoder):
    prompts = [[5, 6, 7], [9, 10, 11]]
    clean = generate(demo_model, prompts, 5, decoder=decoder)
    broken = clean[0][1]  # the second new token of row 0, fed to the model for the third
    assert broken not in prompts[0] + clean[0][:1] + prompts[1] + clean[1]
    poison(demo_model.model.embed_tokens.weight, broken, float("inf"))
    assert generate(demo_model, prompts, 5, decoder=decoder) == [clean[0][:2] + [NON_FINITE] * 3, clean[1]]
    engine, got = Engine(demo_model, 1, 16, decoder), []
    with pytest.raises(K2Error, match=f"{NON_FINITE_PATTERN} 3:"):
        for token in engine.stream(0, prompts[0], Sampler.greedy(demo_model.args.vocab_size), 5):
            got.append(token)
    assert got == clean[0][:2]


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_a_chat_turn_on_nan_logits_raises_and_is_not_kept(demo_dir, params):
    loaded = load(demo_dir, dtype="float32")
    loaded.model.model.norm.weight.data[0] = float("nan")
    session = ChatSession(loaded.engine(1, 256), loaded.tokenizer, loaded.template, loaded.chat_stop_ids(),
                          loaded.reply_parser)
    with pytest.raises(K2Error, match=f"{NON_FINITE_PATTERN} 1:"):
        list(session.send("Hi", params, 8))
    assert session.messages == []


# The commands ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fp16_overflow_dir(demo_dir, tmp_path_factory):
    """The demo with a final-norm weight of 6e4: finite in every dtype, but the normalized hidden state times 6e4
    passes float16's largest value (65504), so the logits are inf in float16 and fine in float32."""
    folder = copy_checkpoint(demo_dir, tmp_path_factory.mktemp("overflow") / "k2-demo")
    name = "model.norm.weight"
    shard = folder / json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][name]
    with safe_open(shard, framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors[name] = torch.full_like(tensors[name], 6e4)
    save_file(tensors, shard, metadata=metadata)
    return folder


def test_generate_chat_and_bench_refuse_logits_that_overflow_the_dtype(fp16_overflow_dir, one_thread):
    folder = fp16_overflow_dir
    ok = run_k2_here("generate", folder, "--ids", "5,6,7", "-n", "3", "--dtype", "float32", "--json")
    assert ok.returncode == 0, ok.stderr
    assert NON_FINITE not in json.loads(ok.stdout)["new_ids"]
    for command in (("generate", folder, "--ids", "5,6,7", "-n", "3"),
                    ("generate", folder, "--ids", "5,6,7", "-n", "3", "--temperature", "0.7", "--seed", "1"),
                    ("chat", folder, "-p", "Hi", "-n", "3"),
                    ("bench", folder, "--prompt-len", "4", "--gen", "2", "--reps", "1", "--warmup", "0")):
        assert_one_line_error(run_k2_here(*command, "--dtype", "float16"), f"{NON_FINITE_MESSAGE} 1:",
                              "--dtype float32")


# The context -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def short_context_dir(demo_dir, tmp_path_factory):
    folder = copy_checkpoint(demo_dir, tmp_path_factory.mktemp("short") / "k2-demo")
    edit_json(folder / "config.json", max_position_embeddings=8, rope_scaling=None)
    return folder


@pytest.mark.parametrize("prompt_len", [8, 12])
def test_generate_refuses_a_prompt_that_fills_the_context(short_context_dir, prompt_len):
    ids = ",".join(map(str, range(5, 5 + prompt_len)))
    assert_one_line_error(run_k2_here("generate", short_context_dir, "--ids", ids, "-n", "2"),
                          f"the prompt has {prompt_len} tokens", "the context holds 8", "max_position_embeddings")


def test_generate_stops_where_prompt_and_reply_fill_the_context(short_context_dir, demo_dir, one_thread):
    result = run_k2_here("generate", short_context_dir, "--ids", "5,6,7,8,9", "-n", "10", "--json")
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ("warning: the prompt's 5 tokens plus --max-tokens 10 exceed the model's context "
                                     "of 8 (max_position_embeddings): stopping after 3 new tokens")
    # Within the context the limit changes nothing: the ids are the engine's first three.
    assert json.loads(result.stdout)["new_ids"] == generate(load_model(short_context_dir), [[5, 6, 7, 8, 9]], 3)[0]


def test_generate_refuses_an_empty_prompt(demo_dir):
    assert_one_line_error(run_k2_here("generate", demo_dir, "--prompt", ""), "the prompt is empty")
    assert_one_line_error(run_k2_here("generate", demo_dir, "--ids", ""), "--ids")
