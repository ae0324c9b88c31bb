"""The one thread that runs the model for the server: requests queue up and are decoded one at a time, in slot 0 of
the engine every command uses, while the event loop stays free to read requests and write streams.

Each request is a `Job`. The worker feeds its tokens (with their log-probabilities, where asked) back to the event
loop as they are drawn; the job's consumer reads them with `async for`. Cancelling a job (its client disconnected, or
it stopped on a stop string) stops its decoding before the next token. The slot's cache is kept between requests, so
a request that extends the last one (an agent's next turn) prefills only what is new.
"""
import asyncio
import queue
import threading
from dataclasses import dataclass, field

import torch

from runtime.engine import Engine
from runtime.errors import K2Error
from runtime.sampling import Sampler, SamplingParams
from runtime.session import common_prefix

MAX_TOP_LOGPROBS = 20  # OpenAI's limit


@dataclass
class Token:
    id: int
    logprob: float | None = None  # of the drawn id, under the model's own distribution (before sampling settings)
    top: list[tuple[int, float]] = field(default_factory=list)  # the most likely ids and their log-probabilities


@dataclass
class Job:
    prompt: list[int]
    params: SamplingParams
    max_new_tokens: int
    stop_ids: set[int]
    top_logprobs: int | None = None  # None: no log-probabilities; 0: only the drawn token's
    cached_tokens: int = 0  # of the prompt, served from the slot's cache (set when decoding starts)
    _cancelled: threading.Event = field(default_factory=threading.Event)
    _queue: asyncio.Queue | None = None
    _loop: asyncio.AbstractEventLoop | None = None

    def cancel(self):
        """Stop decoding before the next token; what was drawn stays drawn."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _put(self, item):
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop has closed (a second Ctrl-C stops the server at once): nobody reads on
            self.cancel()

    def __aiter__(self):
        return self

    async def __anext__(self) -> Token:
        item = await self._queue.get()
        if item is None:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item


class _LogprobSampler(Sampler):
    """A sampler that also keeps the log-probabilities of what it drew, from the logits as the model gave them."""

    def __init__(self, params: SamplingParams, vocab_size: int, device, top: int):
        super().__init__(params, vocab_size, device=device)
        self.top = top
        self.last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        ids = super().__call__(logits)
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        top = logprobs.topk(self.top, dim=-1) if self.top else None
        chosen = logprobs.gather(-1, ids.clamp_min(0)[:, None])[:, 0]
        self.last = (chosen, top.values if top else None, top.indices if top else None)
        return ids

    def token(self, token_id: int) -> Token:
        chosen, values, indices = self.last
        top = [] if values is None else list(zip(indices[0].tolist(), values[0].tolist()))
        return Token(token_id, float(chosen[0]), top)


class Worker:
    """Owns `engine` (one slot) and decodes the jobs submitted to it, in order, on its own thread."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.cache_ids: list[int] = []  # the tokens slot 0 holds, in order
        self.thread = threading.Thread(target=self._run, name="k2-model", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> Job:
        """Queue `job`; iterate it (in the event loop that called this) for its tokens."""
        job._loop, job._queue = asyncio.get_running_loop(), asyncio.Queue()
        self.jobs.put(job)
        return job

    def close(self):
        """Stop once the jobs queued so far are decoded (the server has answered every request by then)."""
        self.jobs.put(None)
        self.thread.join()

    def _run(self):
        while (job := self.jobs.get()) is not None:
            if job.cancelled:
                job._put(None)
                continue
            try:
                self._decode(job)
                job._put(None)
            except Exception as e:  # the job's consumer reports it; the worker goes on with the next job
                job._put(e if isinstance(e, K2Error) else K2Error(f"generation failed: {type(e).__name__}: {e}"))

    def _decode(self, job: Job):
        engine, model = self.engine, self.engine.model
        keep = min(common_prefix(self.cache_ids, job.prompt), len(job.prompt) - 1, engine.length(0))
        job.cached_tokens = keep
        if job.top_logprobs is None:
            sampler = Sampler(job.params, model.args.vocab_size, device=model.device)
        else:
            sampler = _LogprobSampler(job.params, model.args.vocab_size, model.device, job.top_logprobs)
        generated = []
        try:
            for token in engine.stream(0, job.prompt, sampler, job.max_new_tokens, job.stop_ids, keep=keep):
                generated.append(token)
                job._put(sampler.token(token) if job.top_logprobs is not None else Token(token))
                if job.cancelled:
                    break
        finally:
            self.cache_ids = (job.prompt + generated)[:engine.length(0)]
