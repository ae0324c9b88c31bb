"""`k2 eval`: perplexity, KL and agreement, recomputed from transformers' reference model with torch's distributions;
its windows, BOS included, against llama.cpp's perplexity tool."""
import codecs
import json
import shutil
import this

import pytest
import torch
import transformers
from torch.distributions import Categorical, kl_divergence
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from runtime.convert.gguf import ConvertConfig, convert_checkpoint
from runtime.eval import evaluate
from runtime.loader import load
from runtime.loading import load_model
from runtime.models.deepseek_v3_demo import write_demo
from runtime.tokenizer import Tokenizer
from tests.helpers import assert_one_line_error, run_k2_here
from tests.llama_cpp import LlamaCpp

transformers.logging.set_verbosity_error()
CTX = 48
# Larger weights than the demo's make next-token distributions peaked, so the two models below disagree clearly.
PEAKED = {"initializer_range": 0.08}


@pytest.fixture(autouse=True)
def one_thread():
    # The demo's matmuls are tiny: on a busy machine, intra-op threads spinning over them cost ten times the work.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """Real English we did not write: the Zen of Python, as the standard library ships it (rot13)."""
    path = tmp_path_factory.mktemp("text") / "zen.txt"
    path.write_text(codecs.decode(this.s, "rot13"))
    return path


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    return tuple(write_demo(root / name, config_overrides=PEAKED, seed=seed) for name, seed in (("a", 0), ("b", 1)))


def reference_log_probs(folder, ids: list[int]) -> list[torch.Tensor]:
    """transformers' log-probabilities [CTX - 1 - CTX / 2, V] for each whole window of CTX tokens, of the positions
    llama.cpp's perplexity scores (the second half but the last)."""
    config = DeepseekV3Config.from_pretrained(folder)
    config.model_type = "deepseek_v3"
    model = DeepseekV3ForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32).eval()
    windows = [ids[i:i + CTX] for i in range(0, len(ids) - CTX + 1, CTX)]
    with torch.no_grad():
        return [model(torch.tensor([w])).logits[0, CTX // 2:-1].float().log_softmax(-1) for w in windows]


def k2_eval(*args) -> dict:
    result = run_k2_here("eval", *args, "--ctx", CTX, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_perplexity_kl_and_agreement_match_transformers(two_models, text_file):
    model_dir, ref_dir = two_models
    ours = k2_eval(model_dir, "--text", text_file, "--ref", ref_dir)
    ids = Tokenizer.from_folder(model_dir).encode(text_file.read_text())
    model_lp, ref_lp = reference_log_probs(model_dir, ids), reference_log_probs(ref_dir, ids)
    targets = [torch.tensor(ids[i * CTX + CTX // 2 + 1:(i + 1) * CTX]) for i in range(len(model_lp))]

    n = sum(len(t) for t in targets)
    assert ours["tokens"] == n and ours["windows"] == len(model_lp) > 2
    nll = sum(-lp.gather(1, t[:, None]).sum() for lp, t in zip(model_lp, targets)) / n
    ref_nll = sum(-lp.gather(1, t[:, None]).sum() for lp, t in zip(ref_lp, targets)) / n
    assert ours["perplexity"] == pytest.approx(torch.exp(nll).item(), rel=1e-4)
    assert ours["ref_perplexity"] == pytest.approx(torch.exp(ref_nll).item(), rel=1e-4)

    kl = [kl_divergence(Categorical(logits=r), Categorical(logits=m)) for r, m in zip(ref_lp, model_lp)]
    assert ours["kl_mean"] == pytest.approx((sum(k.sum() for k in kl) / n).item(), rel=1e-3)
    assert ours["kl_mean"] > 0.05  # two different models: the check above is not comparing zeros
    agree = sum((r.argmax(-1) == m.argmax(-1)).sum() for r, m in zip(ref_lp, model_lp)).item() / n
    assert ours["top1_agreement"] == pytest.approx(agree, abs=2 / n)  # a near-tie may flip at float noise
    worst = max(range(len(kl)), key=lambda i: kl[i].mean())
    assert ours["worst_window"]["index"] == worst and ours["worst_window"]["start_token"] == worst * CTX


def test_a_model_against_itself(two_models, text_file):
    model_dir, _ = two_models
    result = k2_eval(model_dir, "--text", text_file, "--ref", model_dir, "--max-windows", "2")
    assert result["windows"] == 2 and result["kl_mean"] == pytest.approx(0, abs=1e-6)
    assert result["top1_agreement"] == 1.0 and result["perplexity"] == result["ref_perplexity"]


def test_several_candidates_against_one_reference(two_models, text_file):
    """Each candidate's row is what `k2 eval CANDIDATE --ref REF` says of it alone (checked against transformers
    above); the reference against itself is the zero row; the table prints the same numbers."""
    model_dir, ref_dir = two_models
    args = ("--text", text_file, "--ref", ref_dir, "--ctx", CTX, "--max-windows", "3")
    alone = run_k2_here("eval", model_dir, *args, "--json")
    table = run_k2_here("eval", model_dir, ref_dir, *args, "--json")
    assert alone.returncode == table.returncode == 0, alone.stderr + table.stderr
    alone, table = json.loads(alone.stdout), json.loads(table.stdout)
    assert [c["model"] for c in table["candidates"]] == [str(model_dir), str(ref_dir)]
    assert table["candidates"][0] == alone | {"model": str(model_dir)}
    itself = table["candidates"][1]
    assert itself["kl_mean"] == pytest.approx(0, abs=1e-6) and itself["top1_agreement"] == 1.0
    assert (table["ref_perplexity"], table["tokens"], table["windows"]) == (
        alone["ref_perplexity"], alone["tokens"], alone["windows"])

    text = run_k2_here("eval", model_dir, ref_dir, *args)
    assert text.returncode == 0, text.stderr
    header, *rows = text.stdout.splitlines()[1:]
    assert header.split()[:4] == ["model", "perplexity", "mean", "KL"] and len(rows) == 2
    assert rows[0].split()[:3] == [str(model_dir), f"{alone['perplexity']:.4f}", f"{alone['kl_mean']:.4g}"]
    assert_one_line_error(run_k2_here("eval", model_dir, ref_dir, "--text", text_file), "2 models", "--ref")


def test_windows_and_bos_are_llama_cpps(two_models, text_file, tmp_path):
    """The demo as an F32 GGUF whose vocabulary adds BOS: llama.cpp's perplexity tool and ours cut the same windows,
    put BOS first in each and score the same positions, so the perplexities differ by llama.cpp's arithmetic only."""
    folder = shutil.copytree(two_models[0], tmp_path / "bos")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(config | {"add_bos_token": True}))
    convert_checkpoint(folder, tmp_path / "bos.gguf", ConvertConfig(type="f32"), progress=False)
    yarn = json.loads((folder / "config.json").read_text())["rope_scaling"]
    llm = LlamaCpp(tmp_path / "bos.gguf", n_ctx=CTX, yarn_beta_fast=yarn["beta_fast"],
                   yarn_beta_slow=yarn["beta_slow"])
    text = text_file.read_text()
    theirs = llm.perplexity(text)
    llm.close()
    model = load_model(folder, torch.float32)
    tokenizer = Tokenizer.from_folder(folder)
    ids = tokenizer.encode_document(text)
    ours = evaluate(model, ids, CTX, bos_id=tokenizer.special_tokens["[BOS]"])
    assert (ours["tokens"], ours["windows"]) == (theirs["tokens"], theirs["windows"]) and theirs["windows"] > 2
    assert ours["perplexity"] == pytest.approx(theirs["perplexity"], rel=2e-3)
    # without BOS the windows are others: the check above tells them apart
    assert evaluate(model, ids, CTX)["perplexity"] != pytest.approx(theirs["perplexity"], rel=2e-2)
    # `k2 eval` takes the BOS from the vocabulary, the folder's and the GGUF's alike
    for source in (folder, tmp_path / "bos.gguf"):
        assert load(str(source), weights=False).tokenizer.bos_id == tokenizer.special_tokens["[BOS]"], source


def test_bad_text(two_models, tmp_path):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)))
    assert_one_line_error(run_k2_here("eval", two_models[0], "--text", binary), "not UTF-8")
