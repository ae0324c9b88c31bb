"""The trained demo (`k2 init-demo DIR`, and `demo`): scripts/train_demo.py's weights, shipped with k2, load as a K2
checkpoint and write English.

Held out: the first lines of WikiText-2's raw test split (tests/data/wikitext2-raw-test-head.txt, read as text: its CRLF
line ends become the \n of the training text), which the demo never trained on. Its perplexity there, every position of
whole windows of CTX tokens scored, must be at most a third of a unigram model's: each token's frequency in the demo's
training text (scripts/data/, as scripts/train_demo.py reads it), add-one smoothed over the ranks. A greedy continuation
of "Once upon a time" must be words of that text, and no special token, reserved or control, may come out.
"""
import json
import math
import re
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from runtime.loading import load_model
from runtime.models.deepseek_v3_demo import TRAINED
from runtime.tokenizer import Tokenizer, read_ranks
from tests.helpers import generate, run_k2_here, stored_tensors

ROOT = Path(__file__).resolve().parent.parent
HELD_OUT = ROOT / "tests" / "data" / "wikitext2-raw-test-head.txt"
CTX = 256  # the windows the demo trained on
WORD = re.compile(r"[^\W\d_]+")  # a run of letters


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trained") / "demo"
    result = run_k2_here("init-demo", folder)
    assert result.returncode == 0, result.stderr
    return folder


@pytest.fixture(scope="module")
def model(trained, one_thread):
    return load_model(trained, dtype=torch.float32)


def test_init_demo_writes_the_shipped_weights_and_tokenizer(trained):
    shipped, written = load_file(TRAINED / "model.safetensors"), stored_tensors(trained)
    assert written.keys() == shipped.keys() and all(torch.equal(t, shipped[n]) for n, t in written.items())
    assert (trained / "tiktoken.model").read_bytes() == (TRAINED / "tiktoken.model").read_bytes()


@pytest.fixture(scope="module")
def training_text() -> list[str]:
    sys.path.insert(0, str(ROOT / "scripts"))
    from train_demo import corpora

    return list(corpora().values())


@torch.inference_mode()
def test_held_out_perplexity_is_at_most_a_third_of_a_unigram_models(trained, model, training_text):
    tokenizer = Tokenizer.from_folder(trained)
    ids = tokenizer.encode_document(HELD_OUT.read_text())
    nll, targets = 0.0, []
    for start in range(0, len(ids) - CTX + 1, CTX):  # whole windows, each from an empty cache
        window = torch.tensor([ids[start:start + CTX]])
        log_p = torch.log_softmax(model(window)[0, :-1].float(), dim=-1)
        nll -= log_p.gather(1, window[0, 1:, None]).sum().item()
        targets += ids[start + 1:start + CTX]
    perplexity = math.exp(nll / len(targets))
    counts = Counter(i for text in training_text for i in tokenizer.encode_document(text))
    total, n_ranks = sum(counts.values()), len(read_ranks(trained / "tiktoken.model"))
    unigram = math.exp(-sum(math.log((counts[i] + 1) / (total + n_ranks)) for i in targets) / len(targets))
    assert len(targets) > 5000 and perplexity <= unigram / 3, (perplexity, unigram)


def test_greedy_continuation_is_words_of_its_training_text_and_no_special_token(trained, model, training_text):
    tokenizer = Tokenizer.from_folder(trained)
    n_ranks = len(read_ranks(trained / "tiktoken.model"))
    new_ids = generate(model, [tokenizer.encode("Once upon a time")], 60)[0]
    assert len(new_ids) == 60 and max(new_ids) < n_ranks  # the special ids (reserved and control) follow the ranks
    known = {word for text in training_text for word in WORD.findall(text)}
    words = WORD.findall(tokenizer.decode(new_ids))
    assert len(words) >= 20 and sum(word in known for word in words) >= 0.8 * len(words), words


def test_chat_replies_close_the_think_block_and_end_the_turn(trained):
    """Trained on chats in K2-Thinking's template, the demo answers (content, not endless reasoning) and stops."""
    result = run_k2_here("chat", trained, "-p", "What is your name?", "--temperature", "0", "-n", "100", "--json")
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["stats"]["stop"] == "end of turn" and reply["message"]["content"].strip(), reply
