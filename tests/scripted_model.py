"""A test model whose replies are scripted: tool-call and reasoning tests need a model that writes them, and the
random-weight demo never does. It is a real model family (registered with runtime.models.register_family, which
tests/scripted_k2.py does for a `k2` process), so its replies go through the real loader, engine, sampler, tokenizer
and reply parser.

The script is the model's one weight, `script` [replies, reply_tokens]: row r holds reply r's token ids, padded with
the end-of-turn id (float32: the loader reads weights as floats; ids below 2**24 are exact). config.json gives its
shape and the ids the model looks for. At each position the model predicts, from the tokens up to it:
- the reply: number (count of `<|im_assistant|>` ids - 1) modulo the number of replies;
- the token: that reply's token k, k the number of tokens after the `<|im_middle|>` that follows the last
  `<|im_assistant|>`; past the reply's end (or before any assistant turn opened), the end-of-turn id.
The scripted id gets SCRIPTED_LOGIT and every other id OTHER_LOGIT, far lower but finite, so greedy and sampled
decoding both pick it. The KV cache holds each slot's token ids by position: what a slot keeps after a truncate, and
what a prefix reused across requests, is exactly what the model sees.

`write_scripted(folder, replies)` writes a model folder with K2's tokenizer and chat template and the replies given as
text with K2's markers (`<think>`, `<|tool_calls_section_begin|>`, ...), encoded by that tokenizer.
"""
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from runtime.cache import SlotCache
from runtime.config_schema import NonNegative, Positive, config_args
from runtime.errors import K2Error
from runtime.files import copy_atomic, write_json_atomic
from runtime.models.family import Family

MODEL_TYPE = "k2_scripted"
SCRIPTED_LOGIT, OTHER_LOGIT = 0.0, -1e4
TOKENIZER_FILES = ("tiktoken.model", "tokenizer_config.json", "chat_template.jinja")  # K2's, as the demo has them
ARCH_NAMES = {}  # the family's llama.cpp architectures (runtime/models/family.py `gguf`): none


@config_args
class ModelArgs:
    vocab_size: Positive
    num_replies: Positive
    reply_tokens: Positive  # the longest reply plus one: every row ends in end-of-turn ids
    assistant_token_id: NonNegative  # <|im_assistant|>: opens an assistant turn
    middle_token_id: NonNegative  # <|im_middle|>: ends a turn's header; the reply follows
    eos_token_id: NonNegative  # <|im_end|>: ends a turn
    max_position_embeddings: Positive = 8192

    tie_word_embeddings = False


class ScriptedModel(nn.Module):
    fp32_tensors = ("script",)  # ids: exact in fp32, whatever --dtype says

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.script = nn.Parameter(torch.empty(args.num_replies, args.reply_tokens), requires_grad=False)
        # The loader moves every model's rope frequencies to its device (runtime/loading.py); a script rotates nothing.
        self.register_buffer("inv_freq", torch.empty(0, device="cpu"), persistent=False)

    # The loader's interface (runtime/models/decoder.py has the real models').
    def checkpoint_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"script": tuple(self.script.shape)}

    def skip_tensor(self, name: str) -> bool:
        return False

    @staticmethod
    def locate(name: str) -> tuple[str, None]:
        return name, None

    def moe_blocks(self) -> dict:
        return {}

    # The engine's.
    @property
    def device(self) -> torch.device:
        return self.script.device

    def new_cache(self, batch: int, max_len: int) -> SlotCache:
        return SlotCache({0: self.device}, batch, max_len, 1, torch.long)  # one id per token

    def forward(self, tokens: torch.Tensor, cache: SlotCache | None = None, positions: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, V] (or [B, 1, V]), the tokens appended to `cache` as the real models'
        forward appends them (runtime/models/decoder.py), with or without `positions`."""
        cache = cache if cache is not None else self.new_cache(*tokens.shape)
        B, T = tokens.shape
        if positions is None:
            span = int(cache.lengths.max()) + T
            if span > cache.max_len:
                raise K2Error(f"the cache holds {cache.max_len} tokens; {span - T} are used and {T} more were given")
            positions = (cache.lengths[:, None] + torch.arange(T)).to(tokens.device)
            cache.lengths += T
        else:
            positions, span = positions.view(B, T), cache.max_len + 1
        history = cache.layer(0)[..., 0]  # [B, max_len + 1]: each slot's ids by position
        history[torch.arange(B, device=tokens.device)[:, None], positions] = tokens
        if last_only:
            positions = positions[:, -1:]
        ids, keys = history[:, None, :span], torch.arange(span, device=tokens.device)
        seen = keys <= positions[..., None]  # [B, T, span]: what each position's prediction reads
        assistant = seen & (ids == self.args.assistant_token_id)
        opened = torch.where(assistant, keys, -1).amax(-1)  # [B, T]: the last assistant turn's start, or -1
        middle = torch.where(seen & (ids == self.args.middle_token_id) & (keys > opened[..., None]), keys, span)
        written = positions - middle.amin(-1)  # tokens of the reply so far; < 0 while its header is not over
        reply = (assistant.sum(-1) - 1) % self.args.num_replies
        scripted = self.script[reply, written.clamp(0, self.args.reply_tokens - 1)].long()
        scripted = torch.where((opened >= 0) & (written >= 0), scripted, self.args.eos_token_id)
        logits = torch.full((B, positions.shape[1], self.args.vocab_size), OTHER_LOGIT, device=tokens.device)
        return logits.scatter_(-1, scripted[..., None], SCRIPTED_LOGIT)


def component_of(name: str) -> str:
    return "lm_head"  # the script is what decides the logits


FAMILY = Family(
    name="k2-scripted",
    model_types=(MODEL_TYPE,),
    args_class=ModelArgs,
    model_class=ScriptedModel,
    component_of=component_of,
    gguf=__name__,
    reply_format="kimi_k2",
    reference_model_type="",  # no transformers implementation to compare with
)


def write_scripted(folder: str | Path, replies: list[str], tokenizer_from: str | Path | None = None) -> Path:
    """Write a scripted model folder (created; must not exist) whose reply r is `replies[r]`, text with K2's markers,
    atomically. The tokenizer and chat template are copied from `tokenizer_from` (a folder with K2's tokenizer files),
    by default the demo's (runtime/resolve.py writes it to the user's cache on first use)."""
    from runtime.resolve import DEMO, resolve_model
    from runtime.tokenizer import Tokenizer

    folder = Path(folder)
    source = Path(tokenizer_from) if tokenizer_from is not None else resolve_model(DEMO)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for name in TOKENIZER_FILES:
            copy_atomic(source / name, tmp / name)
        tokenizer = Tokenizer.from_folder(tmp)
        special = tokenizer.special_tokens
        script = [tokenizer.encode_with_added(text) for text in replies]  # the markers become their special ids
        end = special["<|im_end|>"]
        width = max(map(len, script)) + 1
        save_file({"script": torch.tensor([ids + [end] * (width - len(ids)) for ids in script], dtype=torch.float32)},
                  tmp / "model.safetensors")
        config = {"model_type": MODEL_TYPE, "vocab_size": max(special.values()) + 1, "num_replies": len(script),
                  "reply_tokens": width, "assistant_token_id": special["<|im_assistant|>"],
                  "middle_token_id": special["<|im_middle|>"], "eos_token_id": end, "torch_dtype": "float32"}
        write_json_atomic(tmp / "config.json", config, indent=2)
        write_json_atomic(tmp / "generation_config.json",
                          {"eos_token_id": end, "do_sample": True, "temperature": 1.0}, indent=2)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
