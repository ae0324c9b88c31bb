"""Train the built-in demo: a small Kimi K2 that writes English, so `k2 chat` on a fresh install talks back.

    nice -n 19 python scripts/train_demo.py    # seed 0, 750 steps of 12 x 256 tokens: 58 CPU-minutes (74 min wall
                                               # on 2 cores shared with other jobs); needs the test extra

The architecture is K2's at toy size: MLA attention, YaRN rope, a dense first layer, then MoE layers of sigmoid-routed
experts plus a shared expert, routed as K2 routes (top-k of the scores plus `e_score_correction_bias`, weights from
the raw scores). As in K2 there is no auxiliary balance loss: after every step each layer's bias moves a fixed step
toward balance, `bias += BIAS_STEP * sign(mean_load - load)`.

Data (scripts/data/README.md): tinyshakespeare and WikiText-2's validation split, as plain text and as chats (a
speech and the speech that answers it; a WikiText heading and its first paragraph) rendered by K2-Thinking's own
template, so the demo learns to close its think block and end its turn. WikiText-2's test split is held out: the loss
on its first lines (tests/data/wikitext2-raw-test-head.txt) is printed as training goes.

The model trains as transformers' DeepseekV3ForCausalLM, the reference the test suite holds k2's runtime to: its
modules are written for autograd, where k2's own are inference code (a preallocated cache written in place). The
result is written beside runtime/models/deepseek_v3_demo.py, in deepseek_v3_demo_trained/: config.json,
model.safetensors (BF16, the routers' bias FP32, named as K2's checkpoints name them) and tiktoken.model (K2's format).
"""
import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import regex
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runtime import models  # noqa: E402
from runtime.chat_template import ChatTemplate  # noqa: E402
from runtime.models.deepseek_v3_demo import TRAINED, demo_config, train_bpe, write_tokenizer  # noqa: E402
from runtime.tokenizer import K2_SPLIT_PATTERN, Tokenizer, write_ranks  # noqa: E402

DATA = ROOT / "scripts" / "data"
HELD_OUT = ROOT / "tests" / "data" / "wikitext2-raw-test-head.txt"
BPE_RANKS = 4096
# K2's shape at toy size (demo_config holds every other key: YaRN, K2's routing, specials): 8.35 M parameters.
SIZES = {"hidden_size": 256, "intermediate_size": 768, "moe_intermediate_size": 128, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 128, "kv_lora_rank": 64,
         "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32, "n_routed_experts": 16,
         "num_experts_per_tok": 4}
SEQ_LEN, BATCH = 256, 12
CHAT_SHARE = 0.2  # of the rows in a batch; the rest are plain text windows, half from each corpus
STEPS, WARMUP, LR, MIN_LR, WEIGHT_DECAY = 750, 50, 2e-3, 2e-4, 0.1
BIAS_STEP = 5e-3  # DeepSeek-V3 used 1e-3 over far more steps than these 750


def corpora() -> dict[str, str]:
    """The two texts; WikiText's `<unk>` (its rare words, replaced) is dropped: the demo should not learn to write it,
    and the raw test split it is scored on has the real words instead."""
    return {"tinyshakespeare.txt": (DATA / "tinyshakespeare.txt").read_text(),
            "wikitext2-valid.tokens.txt": (DATA / "wikitext2-valid.tokens.txt").read_text().replace(" <unk>", "")}


def train_ranks(texts) -> dict[bytes, int]:
    """K2's split pattern (regex.V1 honours its class intersections, as tiktoken does), then byte-level BPE."""
    words = Counter()
    for text in texts:
        words.update(regex.findall(K2_SPLIT_PATTERN, text, flags=regex.V1))
    return train_bpe(words, BPE_RANKS)


def shakespeare_chats(text: str) -> list[tuple[str, str]]:
    """Consecutive speeches of different speakers: a line and its answer."""
    speeches = []
    for block in text.split("\n\n"):
        speaker, _, speech = block.strip().partition(":\n")
        if speech:
            speeches.append((speaker, speech.strip()))
    return [(a, b) for (who_a, a), (who_b, b) in zip(speeches, speeches[1:]) if who_a != who_b]


def wikitext_chats(text: str) -> list[tuple[str, str]]:
    """Every heading (` = Title = `, ` = = Section = = `) and the paragraph after it."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return [(line.strip("= "), following) for line, following in zip(lines, lines[1:])
            if line.startswith("=") and not following.startswith("=")]


def chat_ids(pairs, template: ChatTemplate, tokenizer: Tokenizer) -> list[int]:
    """Each (question, answer) rendered as K2-Thinking renders a finished turn, one chat after another."""
    control = template.control_tokens(tokenizer)
    ids = []
    for question, answer in pairs:
        text = template.render([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
        ids += tokenizer.encode_marked(text, control)
    return ids


class RouterBalance:
    """K2's auxiliary-loss-free balancing: count each MoE layer's expert loads in the forward pass; after the step,
    move every expert's selection bias toward the mean load."""

    def __init__(self, model, n_experts: int):
        self.routers = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
        self.loads = [torch.zeros(n_experts) for _ in self.routers]
        for router, load in zip(self.routers, self.loads):
            router.register_forward_hook(self._counter(load))

    @staticmethod
    def _counter(load: torch.Tensor):
        def count(module, inputs, out):  # out: router logits, top-k weights, top-k expert ids
            load.add_(torch.bincount(out[2].flatten(), minlength=len(load)).float())
        return count

    @torch.no_grad()
    def update(self) -> float:
        """Step every bias; the worst layer's max/mean load of this step (1 is perfect balance)."""
        worst = 0.0
        for router, load in zip(self.routers, self.loads):
            router.e_score_correction_bias += BIAS_STEP * torch.sign(load.mean() - load)
            worst = max(worst, (load.max() / load.mean()).item())
            load.zero_()
        return worst


def learning_rate(step: int, steps: int) -> float:
    """Linear warm-up, then a cosine down to MIN_LR."""
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, steps - WARMUP)
    return MIN_LR + 0.5 * (LR - MIN_LR) * (1 + math.cos(math.pi * progress))


def batch(streams: list[list[int]], shares: list[float], generator: torch.Generator) -> torch.Tensor:
    """BATCH windows of SEQ_LEN tokens at random offsets, each from a stream drawn by `shares`."""
    which = torch.multinomial(torch.tensor(shares), BATCH, replacement=True, generator=generator)
    rows = []
    for s in which.tolist():
        start = torch.randint(0, len(streams[s]) - SEQ_LEN, (1,), generator=generator).item()
        rows.append(streams[s][start:start + SEQ_LEN])
    return torch.tensor(rows)


@torch.no_grad()
def held_out_loss(model, ids: list[int]) -> float:
    """Mean next-token loss over windows of SEQ_LEN tokens of the held-out text."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(ids) - SEQ_LEN + 1, SEQ_LEN):
        window = torch.tensor([ids[start:start + SEQ_LEN]])
        total += model(input_ids=window, labels=window).loss.item() * (SEQ_LEN - 1)
        count += SEQ_LEN - 1
    model.train()
    return total / count


def checkpoint_tensors(model, config: dict) -> dict[str, torch.Tensor]:
    """The model's weights under K2's checkpoint names (transformers stacks the experts, gate and up fused), BF16 but
    the routers' bias, which K2 stores in FP32."""
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("experts.gate_up_proj"):
            prefix = name.removesuffix("gate_up_proj")
            gates, ups = tensor.chunk(2, dim=1)  # [E, moe_intermediate_size, hidden_size] each
            for e in range(len(tensor)):
                tensors[f"{prefix}{e}.gate_proj.weight"], tensors[f"{prefix}{e}.up_proj.weight"] = gates[e], ups[e]
        elif name.endswith("experts.down_proj"):
            prefix = name.removesuffix("down_proj")
            for e, down in enumerate(tensor):
                tensors[f"{prefix}{e}.down_proj.weight"] = down
        else:
            tensors[name] = tensor
    expected = models.build_on_meta(config).checkpoint_shapes()
    assert {n: tuple(t.shape) for n, t in tensors.items()} == expected, set(tensors) ^ set(expected)
    return {n: t.contiguous() if n.endswith("e_score_correction_bias") else t.to(torch.bfloat16).contiguous()
            for n, t in ((n, tensors[n]) for n in expected)}


def save(folder: Path, config: dict, tensors: dict[str, torch.Tensor], ranks: dict[bytes, int]):
    """Each file under a temporary name, renamed once written."""
    from safetensors.torch import save_file

    folder.mkdir(exist_ok=True)
    writers = {"config.json": lambda p: p.write_text(json.dumps(config, indent=2) + "\n"),
               "model.safetensors": lambda p: save_file(tensors, p, metadata={"format": "pt"}),
               "tiktoken.model": lambda p: write_ranks(p, ranks)}
    for name, write in writers.items():
        tmp = folder / f".{name}.tmp"
        write(tmp)
        tmp.chmod(0o644)
        os.replace(tmp, folder / name)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=STEPS, help="fewer for a quick look (the shipped run: the default)")
    parser.add_argument("--out", type=Path, default=TRAINED)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    start = time.time()
    texts = corpora()
    ranks = train_ranks(texts.values())
    config = demo_config(len(ranks)) | SIZES
    with tempfile.TemporaryDirectory() as folder:
        write_tokenizer(Path(folder), ranks)
        tokenizer, template = Tokenizer.from_folder(folder), ChatTemplate.from_folder(folder)
    shakespeare = tokenizer.encode_document(texts["tinyshakespeare.txt"])
    wikitext = tokenizer.encode_document(texts["wikitext2-valid.tokens.txt"])
    pairs = shakespeare_chats(texts["tinyshakespeare.txt"]) + wikitext_chats(texts["wikitext2-valid.tokens.txt"])
    chats = chat_ids(pairs, template, tokenizer)
    held_out = tokenizer.encode_document(HELD_OUT.read_text())
    print(f"{len(ranks)} ranks in {time.time() - start:.0f} s; tokens: shakespeare {len(shakespeare):,}, wikitext "
          f"{len(wikitext):,}, chats {len(chats):,}, held out {len(held_out):,}", flush=True)

    reference_config = DeepseekV3Config(**{k: v for k, v in config.items() if k not in ("model_type", "torch_dtype")})
    model = DeepseekV3ForCausalLM(reference_config).float().train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.2f} M parameters", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": rest, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.95))
    balance = RouterBalance(model, config["n_routed_experts"])
    generator = torch.Generator().manual_seed(args.seed)
    streams, shares = [shakespeare, wikitext, chats], [(1 - CHAT_SHARE) / 2, (1 - CHAT_SHARE) / 2, CHAT_SHARE]
    train_start, losses = time.time(), []
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps)
        rows = batch(streams, shares, generator)
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        worst_load = balance.update()
        losses.append(loss.item())
        if (step + 1) % 25 == 0 or step == args.steps - 1:
            elapsed = time.time() - train_start
            line = (f"step {step + 1}/{args.steps}  loss {sum(losses[-25:]) / len(losses[-25:]):.3f}  lr "
                    f"{learning_rate(step, args.steps):.1e}  max/mean expert load {worst_load:.2f}  "
                    f"{(step + 1) * BATCH * SEQ_LEN / elapsed:.0f} tok/s  {elapsed / 60:.1f} min")
            if (step + 1) % 100 == 0 or step == args.steps - 1:
                held = held_out_loss(model, held_out)
                line += f"  held-out loss {held:.3f} (ppl {math.exp(held):.1f})"
            print(line, flush=True)
    save(args.out, config, checkpoint_tensors(model, config), ranks)
    print(f"wrote {args.out} after {(time.time() - start) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
