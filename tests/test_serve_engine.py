"""The engine moves `k2 serve`'s continuous batching and prefix reuse rest on, against transformers' reference model
run on each whole sequence alone, without a cache: requests joining a running batch in any slot (holes below the last
running one included), prompts fed in pieces between other slots' steps, prefixes copied between slots and through
the host, and parked slots (a finished request's cache, kept for reuse) left intact by the steps around them."""
import pytest
import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from runtime.engine import Engine
from runtime.loading import load_model
from runtime.sampling import Sampler
from tests.reference_runs import assert_close, random_ids


# Small tensors: a second intra-op thread only adds synchronization, and stalls when the machine is busy.
pytestmark = pytest.mark.usefixtures("one_thread")


class Recording(Sampler):
    """Greedy, keeping every row of logits it drew from."""

    def __init__(self, vocab_size: int):
        super().__init__(Sampler.greedy(vocab_size).params, vocab_size)
        self.logits = []

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        self.logits.append(logits[0].clone())
        return super().__call__(logits)


@pytest.fixture(scope="module")
def models(demo_dir):
    config = DeepseekV3Config.from_pretrained(demo_dir)
    config.model_type = "deepseek_v3"  # kimi_k2 would skip transformers' expert stacking
    ref = DeepseekV3ForCausalLM.from_pretrained(demo_dir, config=config, dtype=torch.float32).eval()
    return load_model(demo_dir, dtype=torch.float32), ref


class Run:
    """One request in the engine: its prompt, the ids drawn for it and the logits they were drawn from."""

    def __init__(self, engine: Engine, slot: int, prompt: list[int], keep: int = 0):
        self.engine, self.slot, self.prompt = engine, slot, prompt
        self.sampler = Recording(engine.model.args.vocab_size)
        self.ids = [int(engine.start(slot, prompt, self.sampler, keep))]

    def took(self, drawn: torch.Tensor):
        self.ids.append(int(drawn[self.slot]))

    def check(self, ref, what: str):
        """Each row of logits it drew from is the reference's for its sequence so far, computed whole."""
        with torch.inference_mode():
            logits = ref(torch.tensor([self.prompt + self.ids[:-1]])).logits[0]
        start = len(self.prompt) - 1
        assert len(self.sampler.logits) == len(self.ids)
        for j, row in enumerate(self.sampler.logits):
            assert_close(row, logits[start + j], f"{what}, token {j}")


def step(engine: Engine, *runs: Run):
    drawn = engine.step()
    for run in runs:
        run.took(drawn)


def held(engine: Engine, slot: int) -> dict[int, torch.Tensor]:
    n = engine.length(slot)
    return {i: b[slot, :n].clone() for i, b in engine.cache.buffers.items()}


def test_requests_join_leave_and_share_prefixes_as_if_each_ran_alone(models):
    model, ref = models
    vocab = model.args.vocab_size
    a, b, c, d, e = (random_ids(vocab, (n,), seed).tolist() for seed, n in enumerate((12, 20, 10, 6, 5)))
    engine = Engine(model, 4, 64, "eager")

    first = Run(engine, 0, a)
    parked = Run(engine, 1, c)  # finished at once: slot 1 parks below the slots still running
    engine.finish(1)
    kept = held(engine, 1)
    step(engine, first)
    # A newcomer in slot 2, its prompt fed in pieces between slot 0's steps.
    engine.prefill(2, b[:8])
    step(engine, first)
    engine.prefill(2, b[8:15])
    step(engine, first)
    joined = Run(engine, 2, b, keep=15)
    step(engine, first, joined)
    # Slot 3 starts from slot 2's first 16 tokens, copied; slot 0's beginning goes to the host and comes back later.
    engine.copy_prefix(2, 3, 16)
    copied = Run(engine, 3, b[:16] + d, keep=16)
    saved = engine.export_prefix(0, 9)
    for _ in range(3):
        step(engine, first, joined, copied)
    engine.finish(0)
    step(engine, joined, copied)  # a hole in slot 0 and the parked slot 1 below the running ones
    engine.import_prefix(0, saved, 9)
    restored = Run(engine, 0, a[:9] + e, keep=9)
    for _ in range(3):
        step(engine, restored, joined, copied)

    for run, what in ((first, "the first request"), (parked, "the request that parked"),
                      (joined, "the newcomer fed in pieces"), (copied, "the request from a copied prefix"),
                      (restored, "the request from a host prefix")):
        run.check(ref, what)
    assert engine.length(1) == len(c) and all(torch.equal(kept[i], t) for i, t in held(engine, 1).items()), \
        "the steps around a parked slot changed what it holds"


def test_a_full_parked_slot_below_a_running_one(models):
    """A parked slot holding the whole context has no column past its tokens; the step writes elsewhere."""
    model, ref = models
    vocab = model.args.vocab_size
    engine = Engine(model, 2, 16, "eager")
    full = Run(engine, 0, random_ids(vocab, (16,), 7).tolist()[:15])
    step(engine, full)  # 16 tokens: the slot is full
    engine.finish(0)
    kept = held(engine, 0)
    running = Run(engine, 1, random_ids(vocab, (5,), 8).tolist())
    for _ in range(4):
        step(engine, running)
    running.check(ref, "the request beside a full parked slot")
    assert all(torch.equal(kept[i], t) for i, t in held(engine, 0).items())
