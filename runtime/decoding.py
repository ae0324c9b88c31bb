"""Decoders: a prefill, then decode steps that feed each sampled id back, with ids staying on the device.

`EagerDecoder` runs the model's own forward step by step on any device. `GraphDecoder` is the CUDA fast path: the
routed experts swapped for the fused kernels, one preallocated latent cache, and one decode step (embedding, every
layer with absorbed MLA, head, sampling, the write of the next id) captured in a CUDA graph; positions and write
slots are device tensors that the graph advances itself, so decoding n tokens is n replays and no host sync.
"""
import torch

from runtime.errors import K2Error
from runtime.kernels import say_once
from runtime.models.deepseek_v3 import Experts, MoE


def suppress_bias(vocab_size: int, suppressed_ids, device) -> torch.Tensor:
    """[V] fp32: 0, and -inf at `suppressed_ids` (a benchmark keeps end-of-sequence from ever being sampled)."""
    bias = torch.zeros(vocab_size, dtype=torch.float32)
    bias[list(suppressed_ids)] = float("-inf")
    return bias.to(device)


def sample(logits: torch.Tensor, bias: torch.Tensor, temperature: float = 0.0) -> torch.Tensor:
    """logits [B, V] -> ids [B] on the device: argmax, or with a temperature Gumbel-max (argmax of logits / T plus
    Gumbel noise samples softmax(logits / T)), which needs no host sync, unlike torch.multinomial."""
    scores = logits.float() + bias
    if temperature > 0:
        scores = scores / temperature - torch.empty_like(scores).exponential_().log()
    return scores.argmax(dim=-1)


class EagerDecoder:
    """The model's forward, one step at a time (any device, placed models, pipelines)."""

    kind = "eager"

    def __init__(self, model, batch: int, max_len: int, bias: torch.Tensor, temperature: float = 0.0):
        self.model, self.batch, self.max_len, self.bias, self.temperature = model, batch, max_len, bias, temperature

    def prefill(self, tokens: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] -> the first sampled ids [B]; starts a new cache."""
        self.cache = self.model.new_cache(self.batch, self.max_len, pad)
        logits = self.model(tokens.to(self.model.device), self.cache, last_only=True)
        self.next_ids = sample(logits[:, -1], self.bias.to(logits.device), self.temperature)
        return self.next_ids

    def decode(self, n: int) -> torch.Tensor:
        """The next `n` ids [B, n], each fed back as the following step's input."""
        out = []
        for _ in range(n):
            logits = self.model(self.next_ids[:, None].to(self.model.device), self.cache)
            self.next_ids = sample(logits[:, -1], self.bias.to(logits.device), self.temperature)
            out.append(self.next_ids)
        return torch.stack(out, dim=1)


def fuse_experts(model) -> str | None:
    """Swap every layer's routed experts for the fused decode kernels' modules (runtime/kernels/fused_moe.py), in
    place. Returns why a layer could not be swapped (then no decode step can be captured), or None."""
    from runtime.int4 import Int4Experts
    from runtime.kernels.fused_moe import FusedExperts, FusedInt4Experts

    for i, layer in enumerate(model.model.layers):
        if not isinstance(layer.mlp, MoE):
            continue
        experts = layer.mlp.experts
        if isinstance(experts, Experts):
            layer.mlp.experts = FusedExperts(experts.gate_proj.data, experts.up_proj.data, experts.down_proj.data)
        elif isinstance(experts, Int4Experts):
            fused = FusedInt4Experts.repack(experts)
            if fused is None:
                return f"layer {i}'s INT4 expert dimensions admit no kernel tiling"
            layer.mlp.experts = fused
        elif not isinstance(experts, (FusedExperts, FusedInt4Experts)):
            return f"layer {i}'s experts are placed ({type(experts).__name__})"
    return None


def _single_cuda_device(model) -> str | None:
    devices = {t.device for t in [*model.parameters(), *model.buffers()] if not t.is_meta}
    if len(devices) != 1 or next(iter(devices)).type != "cuda":
        return f"the model is on {', '.join(sorted(map(str, devices)))}, not on one CUDA device"
    return None


class GraphDecoder:
    """The CUDA fast path: each decode step is one CUDA graph replay over a static cache. Build with `make_decoder`."""

    kind = "cuda-graph"

    def __init__(self, model, batch: int, max_len: int, bias: torch.Tensor, temperature: float = 0.0):
        self.model, self.batch, self.max_len, self.temperature = model, batch, max_len, temperature
        device = model.device
        self.bias = bias.to(device)
        self.cache = model.new_cache(batch, max_len, torch.zeros(batch, dtype=torch.long))
        self.cache.pad = self.cache.pad.to(device)  # read by the captured step, so it lives on the device
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)  # the step's input id
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # the cache slot it is written to
        self.step = torch.zeros(1, dtype=torch.long, device=device)  # its column in `out`
        self.out = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.graph = None
        # Off CUDA the same fixed-shape step runs uncaptured: how the CPU tests check it against the eager decoder.
        self.capture = device.type == "cuda"

    def _step(self):
        m = self.model
        step = m.step_inputs(self.token, self.cache, slots=self.slot)
        h = m.forward_layers(m.model.embed_tokens(self.token), step, self.cache)
        next_ids = sample(m.logits(h)[:, -1], self.bias, self.temperature)
        self.token.copy_(next_ids[:, None])
        self.out.index_copy_(1, self.step, next_ids[:, None])
        self.slot += 1
        self.step += 1

    def _capture(self):
        saved = [t.clone() for t in (self.token, self.slot, self.step)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up steps compile the Triton kernels and settle the allocator
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        for tensor, value in zip((self.token, self.slot, self.step), saved):
            tensor.copy_(value)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()

    def prefill(self, tokens: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        B, T = tokens.shape
        self.cache.length = 0
        self.cache.pad.copy_(torch.zeros(B, dtype=torch.long) if pad is None else pad)
        logits = self.model(tokens.to(self.model.device), self.cache, last_only=True)
        next_ids = sample(logits[:, -1], self.bias, self.temperature)
        self.token.copy_(next_ids[:, None])
        self.slot.fill_(T)
        self.step.zero_()
        self.length = T
        if self.graph is None and self.capture:
            self._capture()
        return next_ids

    def decode(self, n: int) -> torch.Tensor:
        if self.length + n > self.max_len:
            raise K2Error(f"the cache holds {self.max_len} tokens; {self.length} are used and {n} more were asked for")
        self.step.zero_()
        for _ in range(n):
            self.graph.replay() if self.graph is not None else self._step()
        self.length += n
        self.cache.length = self.length
        return self.out[:, :n].clone()


def make_decoder(model, batch: int, max_len: int, bias: torch.Tensor, temperature: float = 0.0, fast: bool = True):
    """The CUDA graph decoder where it can run (one CUDA device, experts fusable), else the eager one; a model
    on CUDA that cannot take the fast path says why, once."""
    if not fast or not hasattr(model, "model") or model.device.type != "cuda":
        return EagerDecoder(model, batch, max_len, bias, temperature)
    reason = _single_cuda_device(model) or fuse_experts(model)
    if reason:
        say_once(f"CUDA graph decode unavailable ({reason}); decoding eagerly")
        return EagerDecoder(model, batch, max_len, bias, temperature)
    return GraphDecoder(model, batch, max_len, bias, temperature)
