"""Other engines on the same checkpoint, driven as `k2 bench` drives ours (prefill a batch of prompts, then decode
steps with the same greedy sampler), so its numbers stand next to a peer's measured in the same run:

- `transformers`: transformers' implementation of the model's family on the same folder;
- `llama.cpp`: llama.cpp (the cyllama wheel's prebuilt build) on the same GGUF file, on as many threads as torch
  uses, its own greedy sampler picking each token from the logits it computed.

Neither is a dependency of k2: each is imported when asked for, and its absence is a one-line error before the model
loads.
"""
import importlib

import torch

from runtime.errors import K2Error
from runtime.sampling import Sampler, feedable


class TransformersEngine:
    kind, package = "transformers", "transformers"

    def __init__(self, loaded, device: torch.device, sampler: Sampler, batch: int, max_len: int):
        import transformers
        from transformers import AutoConfig, AutoModelForCausalLM

        if loaded.gguf_file is not None:
            raise K2Error("--compare transformers needs a model folder; for a GGUF file use --compare llama.cpp")
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        # The family's own model_type: transformers converts per-expert weights only for the types it knows.
        config = AutoConfig.for_model(**loaded.config | {"model_type": loaded.family.reference_model_type})
        dtype = loaded.model.model.embed_tokens.weight.dtype
        self.model = AutoModelForCausalLM.from_pretrained(loaded.folder, config=config, dtype=dtype).to(device).eval()
        self.device, self.sampler = device, sampler

    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=tokens.to(self.device), past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.next_ids = self.sampler(out.logits[:, -1])
        return self.next_ids

    def decode(self, n: int) -> torch.Tensor:
        out = []
        for _ in range(n):
            logits = self.model(input_ids=feedable(self.next_ids)[:, None], past_key_values=self.cache,
                                use_cache=True).logits
            self.next_ids = self.sampler(logits[:, -1])
            out.append(self.next_ids)
        return torch.stack(out, dim=1)


class LlamaCppEngine:
    kind, package = "llama.cpp", "cyllama"

    def __init__(self, loaded, device: torch.device, sampler: Sampler, batch: int, max_len: int):
        from cyllama.llama import llama_cpp

        if loaded.gguf_file is None:
            raise K2Error("--compare llama.cpp needs MODEL to be a GGUF file (k2 convert MODEL OUT.gguf --to gguf)")
        if device.type != "cpu":
            raise K2Error("--compare llama.cpp runs llama.cpp's CPU build: bench with --device cpu")
        if batch != 1:
            raise K2Error("--compare llama.cpp benches one sequence: use --batch 1")
        llama_cpp.disable_logging()
        self.model = llama_cpp.LlamaModel(str(loaded.gguf_file), llama_cpp.LlamaModelParams())
        params = llama_cpp.LlamaContextParams()
        params.n_ctx, params.n_batch, params.n_ubatch = max_len, max_len, min(max_len, 512)
        params.n_threads = params.n_threads_batch = torch.get_num_threads()
        self.context = llama_cpp.LlamaContext(self.model, params)
        self.sampler = llama_cpp.LlamaSampler(llama_cpp.LlamaSamplerChainParams())
        self.sampler.add_greedy()
        self.batch = llama_cpp.LlamaBatch(n_tokens=max_len, embd=0, n_seq_max=1)

    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        self.context.kv_cache_clear()
        self.position = tokens.shape[1]
        self.batch.set_batch(tokens[0].tolist(), n_past=0, logits_all=False)
        self.context.decode(self.batch)
        self.next_id = self.sampler.sample(self.context, -1)
        return torch.tensor([self.next_id])

    def decode(self, n: int) -> torch.Tensor:
        out = []
        for _ in range(n):
            self.batch.set_batch([self.next_id], n_past=self.position, logits_all=False)
            self.context.decode(self.batch)
            self.position += 1
            self.next_id = self.sampler.sample(self.context, -1)
            out.append(self.next_id)
        return torch.tensor([out])


PEERS = {engine.kind: engine for engine in (TransformersEngine, LlamaCppEngine)}


def peer(name: str):
    """The peer engine class called `name`, or a one-line error: no such peer, or its package is not installed."""
    if name not in PEERS:
        raise K2Error(f"--compare takes {' or '.join(PEERS)}, not {name!r}")
    engine = PEERS[name]
    try:
        importlib.import_module(engine.package)
    except ImportError:
        raise K2Error(f"--compare {name} needs the {engine.package} package (pip install 'k2[test]' installs it)") from None
    return engine
