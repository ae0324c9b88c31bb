"""Choosing the next token from logits: repetition penalty, temperature, top-k, top-p, min-p, in transformers' order.

Everything stays on the device: no `.item()` or data-dependent Python branch, so a decode step never waits for the
host. The draw uses the exponential race (argmax of p / Exp(1) is a sample of p) with a seeded generator, so the same
seed gives the same tokens. A row of logits holding a NaN or +inf (or only -inf) draws `NON_FINITE` instead of a token
(argmax would pick the NaN's index, token 0 for an all-NaN row, forever): the sync that already happens where a caller
reads the ids reveals it, and `non_finite_error` says what went wrong.
"""
import math
from dataclasses import dataclass, fields, replace

import torch

from runtime.errors import K2Error

NON_FINITE = -1  # the id drawn from a row of logits holding a NaN or +inf, or only -inf


def non_finite_error(token: int) -> K2Error:
    """The error for a `NON_FINITE` id drawn as new token number `token` (from 1) of a request."""
    return K2Error(f"the model produced non-finite logits (NaN/inf) at token {token}: its weights or the dtype "
                   "overflow; try --dtype float32")


def feedable(ids: torch.Tensor) -> torch.Tensor:
    """Drawn ids as the next step's input: a `NON_FINITE` row feeds token 0 (an embedding lookup of -1 is an index
    error, a device-side assert on CUDA) until its caller reads the ids and stops it."""
    return ids.clamp_min(0)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        checks = [(self.temperature >= 0, "temperature must be >= 0"), (self.top_k >= 0, "top-k must be >= 0"),
                  (0 < self.top_p <= 1, "top-p must lie in (0, 1]"), (0 <= self.min_p <= 1, "min-p must lie in [0, 1]"),
                  (self.repetition_penalty > 0, "repetition penalty must be > 0"),
                  (self.seed is None or -2**63 <= self.seed < 2**64, "seed must fit in 64 bits: -2**63 to 2**64 - 1, "
                                                                      "what torch's generator takes")]
        for ok, message in checks:
            if not ok:
                raise K2Error(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_generation_config(cls, config: dict, **overrides) -> "SamplingParams":
        """A model's recommended sampling (its `generation_config.json`; greedy where it says do_sample false), with
        the options the user gave (None means not given) on top."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in config.items() if k in known and v is not None}
        if config.get("do_sample") is False:
            values["temperature"] = 0.0
        params = cls(**values)
        return replace(params, **{k: v for k, v in overrides.items() if v is not None})

    def describe(self) -> str:
        if self.greedy:
            parts = ["greedy"]
        else:
            parts = [f"temperature {self.temperature:g}"]
            parts += [f"top-k {self.top_k}"] if self.top_k else []
            parts += [f"top-p {self.top_p:g}"] if self.top_p < 1 else []
            parts += [f"min-p {self.min_p:g}"] if self.min_p > 0 else []
        parts += [f"repetition penalty {self.repetition_penalty:g}"] if self.repetition_penalty != 1 else []
        parts += [f"seed {self.seed}"] if self.seed is not None else []
        return ", ".join(parts)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty on every token already in the context: positive logits divided, negative ones multiplied."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p; filtered tokens get -inf. logits [B, V] float32."""
    logits = logits / params.temperature
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if params.top_p < 1:
        # Drop the least likely tokens whose total mass stays within 1 - top_p; the most likely token always stays.
        ascending, order = logits.sort(dim=-1)
        drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - params.top_p
        drop[:, -1] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -math.inf)
    if params.min_p > 0:
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < params.min_p * probs.amax(dim=-1, keepdim=True), -math.inf)
    return logits


class Sampler:
    """Next ids from the last logits, for a batch of rows; remembers the rows' tokens for the repetition penalty.
    `suppress_ids` are never drawn (a benchmark keeps end-of-sequence out so every run decodes its full length)."""

    def __init__(self, params: SamplingParams, vocab_size: int, batch: int = 1, device: torch.device | str = "cpu",
                 suppress_ids=()):
        self.params = params
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(params.seed)
        self.seen = None
        if params.repetition_penalty != 1:
            self.seen = torch.zeros(batch, vocab_size, dtype=torch.bool, device=device)
        self.bias = None
        if suppress_ids:
            self.bias = torch.zeros(vocab_size, dtype=torch.float32)
            self.bias[list(suppress_ids)] = -math.inf
            self.bias = self.bias.to(device)

    @classmethod
    def greedy(cls, vocab_size: int, device: torch.device | str = "cpu", suppress_ids=()) -> "Sampler":
        return cls(SamplingParams(temperature=0.0), vocab_size, device=device, suppress_ids=suppress_ids)

    def observe(self, ids: torch.Tensor):
        """Tokens now in the context (the prompt, then each sampled id), ids [B, T] on the sampler's device."""
        if self.seen is not None:
            self.seen.scatter_(1, ids, True)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] -> ids [B] (int64, on the logits' device); `NON_FINITE` for a row holding a NaN or +inf,
        or only -inf."""
        logits = logits.float()
        # One reduction: the max is NaN if any logit is, inf if one is, -inf if all are. Other -inf logits are tokens
        # masked on purpose (as the bias below does), not a broken row.
        finite = logits.amax(dim=-1).isfinite()
        if self.bias is not None:
            logits = logits + self.bias
        if self.seen is not None:
            logits = apply_repetition_penalty(logits, self.seen, self.params.repetition_penalty)
        if self.params.greedy:
            ids = logits.argmax(dim=-1)
        else:
            probs = filter_logits(logits, self.params).softmax(dim=-1)
            # clamped: a zero draw would turn a filtered token's 0 / 0 into NaN, which argmax prefers
            race = torch.empty_like(probs).exponential_(generator=self.generator).clamp_min_(torch.finfo(probs.dtype).tiny)
            ids = (probs / race).argmax(dim=-1)
        self.observe(ids[:, None])
        return torch.where(finite, ids, NON_FINITE)
