"""Sampling against transformers' own logits processors and a frequency test of the draws; seeded generation on the
demo model, in the library and through `k2 generate`."""
import json

import pytest
import torch
from transformers.generation.logits_process import (LogitsProcessorList, MinPLogitsWarper,
                                                    RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from runtime.errors import K2Error
from runtime.loader import load
from runtime.loading import load_model
from runtime.sampling import Sampler, SamplingParams, apply_repetition_penalty, filter_logits
from tests.helpers import generate, run_k2_here

PARAMS = [
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_k=5),
    SamplingParams(temperature=1.0, top_p=0.8),
    SamplingParams(temperature=0.6, min_p=0.1),
    SamplingParams(temperature=0.9, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.3),
    SamplingParams(temperature=1.0, repetition_penalty=0.8),
]


def transformers_processors(params: SamplingParams) -> LogitsProcessorList:
    """The chain transformers' generate() builds for these settings, in its order."""
    chain = LogitsProcessorList()
    if params.repetition_penalty != 1:
        chain.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    chain.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        chain.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1:
        chain.append(TopPLogitsWarper(params.top_p))
    if params.min_p:
        chain.append(MinPLogitsWarper(params.min_p))
    return chain


def ours(logits, input_ids, params):
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, input_ids, True)
    if params.repetition_penalty != 1:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    return filter_logits(logits, params)


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: p.describe())
def test_filters_equal_transformers(params):
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(6, 300, generator=generator)
    input_ids = torch.randint(0, 300, (6, 40), generator=generator)
    expected = transformers_processors(params)(input_ids, logits.clone())
    got = ours(logits.clone(), input_ids, params)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    finite = ~torch.isinf(expected)
    torch.testing.assert_close(got[finite], expected[finite])
    assert (finite.sum(dim=-1) >= 1).all()


@pytest.mark.parametrize("params", PARAMS[1:5], ids=lambda p: p.describe())
def test_draws_follow_the_filtered_distribution(params):
    generator = torch.Generator().manual_seed(1)
    logits = 2 * torch.randn(1, 12, generator=generator)
    input_ids = torch.tensor([[0, 3, 3, 7]])
    target = transformers_processors(params)(input_ids, logits.clone()).softmax(dim=-1)[0]
    rows = 200_000
    sampler = Sampler(params, 12, batch=rows)
    sampler.observe(input_ids.expand(rows, -1))
    ids = sampler(logits.expand(rows, -1))
    frequency = torch.bincount(ids, minlength=12) / rows
    assert (frequency[target == 0] == 0).all()  # a filtered token is never drawn
    assert (frequency - target).abs().max() < 0.006  # 6 standard errors at worst


def test_same_seed_same_draws():
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(2))
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=7)
    a, b = Sampler(params, 1000, batch=64), Sampler(params, 1000, batch=64)
    first = [a(logits) for _ in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(first, [b(logits) for _ in range(5)]))
    other = Sampler(SamplingParams(temperature=1.0, top_p=0.95, seed=8), 1000, batch=64)
    assert not all(torch.equal(x, other(logits)) for x in first)


def test_greedy_is_argmax_after_the_penalty():
    logits = torch.tensor([[1.0, 3.0, 2.9, -1.0]])
    assert Sampler(SamplingParams(temperature=0), 4)(logits).tolist() == [1]
    penalized = Sampler(SamplingParams(temperature=0, repetition_penalty=1.5), 4)
    penalized.observe(torch.tensor([[1]]))
    expected = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([[1]]), logits.clone()).argmax(dim=-1)
    assert penalized(logits).tolist() == expected.tolist() == [2]
    assert penalized.seen[0, 2]  # the drawn token now counts as seen


def test_params_from_generation_config(demo_dir):
    assert load(demo_dir, weights=False).sampling() == SamplingParams(temperature=1.0)  # do_sample true, temperature 1
    config = {"do_sample": False, "top_p": 0.9, "eos_token_id": 5}
    params = SamplingParams.from_generation_config(config, seed=3, top_k=None)
    assert (params.greedy, params.top_p, params.seed, params.top_k) == (True, 0.9, 3, 0)
    assert SamplingParams.from_generation_config(config, temperature=0.5).temperature == 0.5
    for bad in ({"top_p": 0.0}, {"temperature": -1.0}, {"min_p": 2.0}, {"repetition_penalty": 0.0}):
        with pytest.raises(K2Error):
            SamplingParams(**bad)


@pytest.fixture(scope="module")
def demo_model(demo_dir):
    return load_model(demo_dir, dtype=torch.float32)


def sample_generate(model, prompt, sampler, max_new_tokens, stop_ids=()):
    return generate(model, [prompt], max_new_tokens, [sampler], stop_ids)[0]


def test_sampled_generation_on_the_demo(demo_model):
    prompt, vocab = [5, 6, 7, 8, 9], demo_model.args.vocab_size
    greedy = generate(demo_model, [prompt], 8)[0]
    assert sample_generate(demo_model, prompt, Sampler(SamplingParams(temperature=0), vocab), 8) == greedy
    params = SamplingParams(temperature=1.0, top_k=50, seed=11)
    first = sample_generate(demo_model, prompt, Sampler(params, vocab), 10)
    assert sample_generate(demo_model, prompt, Sampler(params, vocab), 10) == first and len(first) == 10
    stopped = sample_generate(demo_model, prompt, Sampler(params, vocab), 10, stop_ids={first[3]})
    assert stopped == first[:first.index(first[3]) + 1]  # ends at, and includes, the first stop id
    # Suppressed ids are never drawn, greedy or sampled.
    banned = set(greedy) | set(first)
    for params in (SamplingParams(temperature=0), params):
        assert not banned & set(sample_generate(demo_model, prompt, Sampler(params, vocab, suppress_ids=banned), 10))


def test_generate_command_sampling_flags(demo_dir, demo_model):
    args = ("generate", demo_dir, "--ids", "5,6,7,8,9", "-n", "10", "--dtype", "float32", "--json",
            "--temperature", "0.8", "--top-p", "0.9", "--seed", "4")
    result = run_k2_here(*args)
    assert result.returncode == 0, result.stderr
    expected = sample_generate(demo_model, [5, 6, 7, 8, 9],
                               Sampler(SamplingParams(temperature=0.8, top_p=0.9, seed=4), demo_model.args.vocab_size),
                               10, stop_ids=load(demo_dir, weights=False).eos_ids)
    assert json.loads(result.stdout)["new_ids"] == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are only observable on a GPU")
def test_sampling_never_syncs_with_the_host():
    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, min_p=0.02, repetition_penalty=1.1, seed=0)
    sampler = Sampler(params, 32000, device="cuda")
    logits = torch.randn(1, 32000, device="cuda")
    sampler.observe(torch.randint(0, 32000, (1, 100), device="cuda"))
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            logits = logits + sampler(logits)[:, None].float()
    finally:
        torch.cuda.set_sync_debug_mode("default")
