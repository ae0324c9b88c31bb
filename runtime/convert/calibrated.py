"""`k2 quantize --method gptq`: the model walked layer by layer over calibration text, each weight quantized with the
Hessian of the inputs it actually receives.

The calibration tokens' hidden states [sequences, tokens, hidden] are carried from layer to layer, and each layer
runs on them with the layers before it already quantized, as GPTQ does: memory holds one layer's small weights, one
routed expert per worker and the hidden states, never the model. Within a layer, the attention's linears (when the
scope has them) get Hessians from one float forward, then the attention runs quantized. The router picks experts on
the result, and each routed expert's Hessians come from exactly the tokens routed to it: gate and up projections from
those tokens, the down projection from what the quantized gate and up make of them. An expert routed fewer than
`min_expert_tokens` falls back to mse and is counted. A shared expert or dense MLP is an expert that sees every token.
Weights the scope leaves alone run as the output stores them (BF16), so the walk computes what the output model will.
The layer is run as every family here writes it, pre-norm: h + attn(norm(h)), then h + mlp(norm(h)).

Every tensor goes to a `sink` (runtime/convert/quantize.py writes it into its planned shard) as soon as it is final;
after each layer the sink gets the hidden states that follow it, which is what `--resume` restarts from.
"""
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from quant.gptq import Hessian
from quant.int4 import dequantize_groups, ungroup
from quant.methods import FALLBACK, Int4Spec
from runtime.convert.sources import Source, natural_key, read_rows, release_rows, row_blocks
from runtime.errors import K2Error
from runtime.eval import windows
from runtime.models.family import hf_layer_of
from runtime.safetensors_io import TORCH_DTYPES

CALIB_SEQUENCE = 512  # tokens per calibration sequence, each run from an empty cache
MIN_CALIB_TOKENS = 16
ATTENTION_SCORES = 1 << 24  # attention runs on as many sequences at once as keep [batch, heads, T, T] under this
ACTIVATIONS = 1 << 24  # an MLP runs on as many tokens at once as keep [tokens, intermediate] under this
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def calibration_tokens(loaded, text: str, limit: int) -> torch.Tensor:
    """The first `limit` tokens of `text` as sequences [S, T] of up to CALIB_SEQUENCE tokens, each begun with BOS
    when the vocabulary adds one (as `k2 eval` cuts its windows); a partial last sequence is dropped."""
    if not loaded.has_tokenizer:
        raise K2Error(f"{loaded.folder} has no tokenizer to read the calibration text with")
    tokenizer = loaded.tokenizer
    ids = tokenizer.encode_document(text)[:limit]
    if len(ids) < MIN_CALIB_TOKENS:
        raise K2Error(f"the calibration text has {len(ids)} token(s); GPTQ needs at least {MIN_CALIB_TOKENS}")
    length = min(CALIB_SEQUENCE, len(ids))
    return torch.tensor([window for _, window in windows(ids, length, tokenizer.bos_id)])


@contextmanager
def _one_thread():
    """Torch ops on one core: the experts' workers (no oversubscription, and each expert's sums in a fixed order), and
    GPTQ's column loop, whose ops are each one column long, where a thread pool's wake-ups cost more than it gains
    (13x slower on two busy cores). Nested, as in a worker, it leaves one thread as it found it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _in_order(pool, fn, items, ahead: int):
    """fn(item) for each item on the pool, results in item order, at most `ahead` computed and not yet consumed."""
    pending = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


class CalibratedWalk:
    def __init__(self, loaded, reader, sources: list[Source], roles, method, spec: Int4Spec, min_expert_tokens: int,
                 sink, workers: int):
        self.model = loaded.model  # on the meta device: a layer's small tensors are filled when it is reached
        self.component_of = loaded.family.component_of
        self.reader, self.sources, self.roles = reader, {s.name: s for s in sources}, roles
        self.method, self.fallback, self.spec = method, FALLBACK(), spec
        self.min_expert_tokens, self.sink, self.workers = min_expert_tokens, sink, workers
        self._lock = threading.Lock()
        self.summary = {"gptq_tensors": 0, "fallback_tensors": 0, "fallback_experts": []}

    # -- tensors in and out

    def _read(self, name: str) -> torch.Tensor:
        """The weight in float32 as the walk computes with it: as the output stores it, unless it is quantized
        here (then as the input has it, which is what gets quantized)."""
        source = self.sources[name]
        r0, r1 = (0, source.shape[0]) if len(source.shape) == 2 else (None, None)
        tensor = read_rows(source, self.reader, r0, r1)
        release_rows(source, self.reader, r0, r1)
        if name in self.roles.quantized:
            return tensor
        return tensor.to(TORCH_DTYPES[self.roles.output_dtype(source)]).float()

    def _quantize(self, name: str, w: torch.Tensor, hessian: Hessian | None) -> torch.Tensor:
        """Quantize weight `name` (GPTQ with a Hessian, the fallback without), hand it to the sink, and return it
        dequantized: what the rest of the walk computes with."""
        with _one_thread():
            if hessian is None:
                q, scale = self.fallback.quantize(name, w, self.spec)
            else:
                q, scale = self.method.quantize(w, hessian.value(), self.spec)
        with self._lock:
            self.summary["fallback_tensors" if hessian is None else "gptq_tensors"] += 1
        self.sink.quantized(name, w, q, scale, {"method": self.fallback.name if hessian is None else self.method.name,
                                                "calibration_tokens": 0 if hessian is None else hessian.tokens})
        return ungroup(dequantize_groups(q, scale), w.shape[1])

    def _fill(self, name: str):
        """Put checkpoint tensor `name` into the (meta) model, in float32."""
        target, _ = self.model.locate(name)
        module_name, _, leaf = target.rpartition(".")
        module = self.model.get_submodule(module_name)
        tensor = self._read(name)
        if leaf in module._parameters:
            module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
        else:
            module._buffers[leaf] = tensor

    # -- the walk

    def run(self, tokens: torch.Tensor, first: int, hidden: torch.Tensor | None, progress: bool) -> dict:
        """Walk layers `first`.. over the calibration `tokens` [S, T], from the hidden states entering layer `first`
        (None: from the embedding); the tensors outside the layers the model runs go to the sink first."""
        n_layers = self.model.args.num_hidden_layers
        for name, source in self.sources.items():
            layer = hf_layer_of(name)
            if (layer is None or layer >= n_layers) and self.sink.pending(name):
                if name in self.roles.quantized:  # layers the forward never runs (DeepSeek-V3's MTP): no inputs
                    self._quantize(name, self._read(name), None)
                else:
                    self.sink.copy(source)
        if first >= n_layers:
            return self.summary
        hidden = self._embed(tokens) if hidden is None else hidden
        for i in tqdm(range(first, n_layers), desc="calibrating", unit="layer", disable=not progress):
            hidden = self._layer(i, hidden)
            if not torch.isfinite(hidden).all():
                raise K2Error(f"the calibration hidden states are not finite after layer {i}: the weights (or the "
                              "quantized ones) overflow")
            self.sink.layer_done(i, hidden)
        self.summary["fallback_experts"].sort(key=lambda f: natural_key(f["expert"]))  # workers finish in any order
        return self.summary

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The embedding rows of the calibration tokens [S, T, hidden], read block by block (never the whole matrix)."""
        source = self.sources["model.embed_tokens.weight"]
        flat = tokens.flatten()
        hidden = torch.empty(len(flat), source.shape[1])
        dtype = TORCH_DTYPES[self.roles.output_dtype(source)]
        for r0, r1 in row_blocks(source.shape):
            picked = (flat >= r0) & (flat < r1)
            if picked.any():
                hidden[picked] = read_rows(source, self.reader, r0, r1)[flat[picked] - r0].to(dtype).float()
            release_rows(source, self.reader, r0, r1)
        return hidden.view(*tokens.shape, -1)

    def _layer(self, i: int, hidden: torch.Tensor) -> torch.Tensor:
        layer = self.model.model.layers[i]
        prefix = f"model.layers.{i}."
        for name, source in self.sources.items():
            if not name.startswith(prefix):
                continue
            if name not in self.roles.quantized and self.sink.pending(name):
                self.sink.copy(source)
            mlp_weight = ".mlp." in name and name.endswith("_proj.weight")
            if self.component_of(name) != "routed_experts" and not mlp_weight and not self.model.skip_tensor(name):
                self._fill(name)  # attention, norms, router; the MLPs' weights are read as they run
        try:
            hidden += self._attention(i, layer, hidden)
            x = layer.post_attention_layernorm(hidden).flatten(0, 1)
            return hidden.add_(self._feed_forward(f"{prefix}mlp", layer.mlp, x).view_as(hidden))
        finally:
            layer.to_empty(device="meta")

    def _attention(self, i: int, layer, hidden: torch.Tensor) -> torch.Tensor:
        linears = {f"model.layers.{i}.self_attn.{name}.weight": module
                   for name, module in layer.self_attn.named_modules() if isinstance(module, nn.Linear)}
        linears = {name: module for name, module in linears.items() if name in self.roles.quantized}
        if linears:
            hessians = {name: Hessian(module.in_features) for name, module in linears.items()}

            def collect(hessian: Hessian):
                def hook(module, args):
                    hessian.add(args[0])
                return hook

            hooks = [module.register_forward_pre_hook(collect(hessians[name])) for name, module in linears.items()]
            try:
                self._run_attention(i, layer, hidden)
            finally:
                for hook in hooks:
                    hook.remove()
            for name, module in linears.items():
                module.weight.data = self._quantize(name, module.weight.data, hessians[name])
        return self._run_attention(i, layer, hidden)

    def _run_attention(self, i: int, layer, hidden: torch.Tensor) -> torch.Tensor:
        sequences, length, _ = hidden.shape
        batch = max(1, ATTENTION_SCORES // (self.model.args.num_attention_heads * length * length))
        out = torch.empty_like(hidden)
        for b0 in range(0, sequences, batch):
            part = hidden[b0:b0 + batch]
            cache = self.model.new_cache(len(part), length, [i])
            step = self.model.step_inputs(torch.zeros(part.shape[:2], dtype=torch.long), cache)
            out[b0:b0 + len(part)] = layer.self_attn(layer.input_layernorm(part), step, cache.layer(i))
        return out

    def _feed_forward(self, prefix: str, mlp, x: torch.Tensor) -> torch.Tensor:
        """x [N, hidden] -> the MLP's output [N, hidden]: a dense MLP, or routed experts plus any shared expert."""
        if not isinstance(mlp, self.model.moe_block_class):
            return self._swiglu(prefix, x, calibrated=True)
        weights, ids = mlp.gate(x)  # [N, k] each: the router's own choices on these hidden states
        k, n_experts = ids.shape[1], mlp.experts.n_experts
        flat = ids.flatten()
        order = flat.argsort(stable=True)  # (token, slot) pairs grouped by expert, tokens ascending within each
        starts = [0, *torch.bincount(flat, minlength=n_experts).cumsum(0).tolist()]

        def expert(e: int):
            pairs = order[starts[e]:starts[e + 1]]
            rows = pairs // k
            out = self._swiglu(f"{prefix}.experts.{e}", x[rows], len(rows) >= self.min_expert_tokens)
            return rows, out * weights.flatten()[pairs, None]

        y = torch.zeros_like(x)
        with _one_thread(), ThreadPoolExecutor(self.workers, thread_name_prefix="k2-gptq") as pool:
            for rows, out in _in_order(pool, expert, range(n_experts), 2 * self.workers):
                y.index_add_(0, rows, out)
        shared = getattr(mlp, "shared_experts", None)
        if shared is not None:
            y += self._swiglu(f"{prefix}.shared_experts", x, calibrated=True)
        return y

    def _swiglu(self, prefix: str, x: torch.Tensor, calibrated: bool) -> torch.Tensor:
        """down(silu(gate(x)) * up(x)) for the expert or MLP at `prefix`, quantizing its weights on the way when the
        scope has them: gate and up from x's Hessian, down from its input as the quantized gate and up make it."""
        names = [f"{prefix}.{p}.weight" for p in PROJECTIONS]
        gate, up, down = (self._read(name) for name in names)
        if names[0] in self.roles.quantized:
            if not calibrated:
                with self._lock:
                    self.summary["fallback_experts"].append({"expert": prefix, "tokens": len(x)})
            hessian = Hessian.of(x) if calibrated else None
            gate, up = (self._quantize(name, w, hessian) for name, w in zip(names[:2], (gate, up)))
        # A chunk of tokens at a time: the intermediate activations of every calibration token would be the walk's
        # largest tensors (K2's dense MLP: 72 KiB a token each), so they are made twice, for down's Hessian and for
        # the output.
        chunks = x.split(max(1, ACTIVATIONS // gate.shape[0]))

        def inner(rows: torch.Tensor) -> torch.Tensor:
            return F.silu(rows @ gate.T) * (rows @ up.T)

        if names[2] in self.roles.quantized:
            hessian = None
            if calibrated:
                hessian = Hessian(gate.shape[0])
                for rows in chunks:
                    hessian.add(inner(rows))
            down = self._quantize(names[2], down, hessian)
        return torch.cat([inner(rows) @ down.T for rows in chunks])
