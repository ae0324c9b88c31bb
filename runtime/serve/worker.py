"""The one thread that runs the model for the server: a scheduler that decodes many requests at once in the engine's
slots (continuous batching), while the event loop stays free to read requests and write streams.

Each request is a `Job`; the worker feeds its tokens (with their log-probabilities, where asked) back to the event
loop as they are drawn, and its consumer reads them with `async for`. At most `max_queue` jobs wait for a slot; past
that `submit` refuses at once (the server's 429). Between two decode steps the scheduler
- ends the jobs whose client left (cancelled) or that are done, freeing their slots;
- gives waiting jobs free slots, each starting from the cache that shares the longest beginning with its prompt: a
  finished job's slot (taken as it is), another slot's cache or a stored prefix (copied), so an agent's next turn
  computes only what is new;
- feeds newcomers' prompts in pieces, PREFILL_PIECE tokens per iteration while others decode, so a long prompt
  delays the others' next token by one piece, not by the whole prompt;
- runs one engine step for every slot decoding and hands each job its token.
A finished job's slot keeps its cache (parked) until a newcomer needs the slot; its rows are then copied to the
host prefix store (prefix_store.py), which keeps them within the --cache-budget, least recently used dropped.
"""
import asyncio
import itertools
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from runtime.engine import PREFILL_CHUNK, Engine
from runtime.errors import K2Error
from runtime.sampling import NON_FINITE, Sampler, SamplingParams, non_finite_error
from runtime.serve.errors import RequestError
from runtime.serve.metrics import Metrics, RequestStats
from runtime.serve.prefix_store import Entry, PrefixStore
from runtime.session import common_prefix

MAX_TOP_LOGPROBS = 20  # OpenAI's limit
PREFILL_PIECE = 256  # prompt tokens computed per iteration while other requests decode


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
    cached_tokens: int = 0  # of the prompt, served from a cached prefix (set when it gets a slot)
    stats: RequestStats = field(default_factory=RequestStats)
    _cancelled: threading.Event = field(default_factory=threading.Event)
    _queue: asyncio.Queue | None = None
    _loop: asyncio.AbstractEventLoop | None = None

    def cancel(self):
        """Stop decoding before the next token; what was drawn stays drawn."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

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


def _deliver(items: list[tuple[Job, Token | BaseException | None]]):
    for job, item in items:
        job._queue.put_nowait(item)


@dataclass
class _Slot:
    ids: list[int] = field(default_factory=list)  # what the slot's cache holds, in order
    job: Job | None = None  # the job holding the slot; None: free (parked if `ids`, else empty)
    sampler: Sampler | None = None  # set once the job's first token is drawn: it decodes
    pending: int = 0  # the last drawn id, fed (and so cached) by the next step
    used: float = 0.0  # when it last held a job: the least recently used parked slot is reused first
    prompt_tokens: int = 0  # of the last job's prompt: a request sharing all of it continues that conversation


class Worker:
    """Owns `engine` and decodes the jobs submitted to it on its own thread, up to one per engine slot at a time."""

    def __init__(self, engine: Engine, max_queue: int = 64, cache_budget: int = 0, log: bool = False):
        self.engine, self.max_queue, self.log = engine, max_queue, log
        self.slots = [_Slot() for _ in range(engine.cache.batch)]
        self.store = PrefixStore(cache_budget if engine.copies_prefixes else 0)
        self.metrics = Metrics(len(self.slots), self.store.budget_bytes)
        self.waiting: deque[Job] = deque()
        self.busy = 0  # slots holding a job; with `waiting` and `closing`, guarded by `lock`
        self.closing = False
        self.lock = threading.Condition()
        self.numbers = itertools.count(1)
        self.dropped = 0  # parked caches reused without a copy kept (past the budget): evictions besides the store's
        self.outbox: list[tuple[Job, Token | BaseException | None]] = []  # for the event loop, sent once per iteration
        self.thread = threading.Thread(target=self._run, name="k2-model", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> Job:
        """Queue `job`; iterate it (in the event loop that called this) for its tokens. A RequestError (429) if more
        than `max_queue` jobs would wait for a slot."""
        job._loop, job._queue = asyncio.get_running_loop(), asyncio.Queue()
        with self.lock:
            waiting = sum(not j.cancelled for j in self.waiting) - (len(self.slots) - self.busy)
            if waiting >= self.max_queue:
                self.metrics.rejected += 1
                raise RequestError(f"the server is busy: {len(self.waiting)} requests wait for one of its "
                                   f"{len(self.slots)} slots, {self.max_queue} past the free ones at most (k2 serve "
                                   "--max-queue); retry later", status=429)
            job.stats.submitted = time.perf_counter()
            self.waiting.append(job)
            self.metrics.queued = len(self.waiting)
            self.lock.notify()
        return job

    def close(self):
        """Stop once the jobs submitted so far are decoded (the server has answered every request by then)."""
        with self.lock:
            self.closing = True
            self.lock.notify()
        self.thread.join()

    # The loop --------------------------------------------------------------------------------------------------

    def _run(self):
        while True:
            with self.lock:
                while not self.waiting and not self.busy and not self.closing:
                    self.lock.wait()
                if self.closing and not self.waiting and not self.busy:
                    return
                newcomers = self._take_waiting()
            try:
                self._iterate(newcomers)
            except Exception as e:  # a fault of the scheduler itself: the jobs in slots end with it, the server goes on
                for i, slot in enumerate(self.slots):
                    if slot.job is not None:
                        self._fail(i, e)
                self._send()

    def _iterate(self, newcomers: list[Job]):
        for job in newcomers:
            self._place(job)
        self._prefill()
        self._send()  # newcomers' first tokens go out before the step, which takes a while
        if any(slot.sampler is not None for slot in self.slots):
            self._decode()
            self._send()

    def _take_waiting(self) -> list[Job]:
        """The waiting jobs that free slots can take now, oldest first (under the lock); the cancelled ones end."""
        for job in [j for j in self.waiting if j.cancelled]:
            self.waiting.remove(job)
            self.outbox.append((job, None))
        taken = [self.waiting.popleft() for _ in range(min(len(self.waiting), len(self.slots) - self.busy))]
        self.busy += len(taken)
        self.metrics.queued, self.metrics.running = len(self.waiting), self.busy
        return taken

    # Admission -------------------------------------------------------------------------------------------------

    def _place(self, job: Job):
        """Give `job` a free slot holding the longest beginning of its prompt that any cache holds: a parked slot
        whose last prompt it extends (an agent's next turn) is taken as it is; otherwise the beginning is copied,
        from another slot or the prefix store, into an empty slot or the parked one least recently used."""
        engine, prompt = self.engine, job.prompt
        job.stats.admitted, job.stats.prompt_tokens = time.perf_counter(), len(prompt)
        # Another slot's cache can be copied from, except in a pipeline: there only a parked slot taken as it is.
        sources = [(common_prefix(slot.ids, prompt), i) for i, slot in enumerate(self.slots)
                   if slot.ids and (engine.copies_prefixes or slot.job is None)]
        shared, source = max(sources, default=(0, None))
        entry, stored = self.store.longest(prompt)
        from_store = stored > shared
        parked = source is not None and self.slots[source].job is None
        continues = parked and shared >= self.slots[source].prompt_tokens
        if not from_store and parked and (continues or not engine.copies_prefixes):
            target = source
        else:  # the source stays for its own conversation (if there is another free slot)
            target = self._free_slot(exclude=source)
            target = source if target is None else target
        keep = min(stored if from_store else shared, len(prompt) - 1)  # one at least is computed: it draws the first
        slot = self.slots[target]
        carried = target == source and continues and not from_store
        slot.job, slot.prompt_tokens = job, len(prompt)
        try:
            if from_store:  # first: room made for the target's cache must not drop the entry about to be read
                self.store.use(entry)
            if not carried:  # what the slot holds goes to the store first; its rows are overwritten or cut after
                self._spill(target)
            if keep and from_store:
                engine.import_prefix(target, entry.rows, keep)
            elif keep and target != source:
                engine.copy_prefix(source, target, keep)
            engine.truncate(target, keep)
            slot.ids = prompt[:keep]
            job.cached_tokens = job.stats.cached_tokens = keep
        except Exception as e:
            self._fail(target, e)

    def _free_slot(self, exclude: int | None) -> int | None:
        """The empty slot with the lowest index (a decode step computes the slots up to the last running one), else
        the parked one least recently used; never `exclude`, a cache about to be copied from."""
        free = [i for i, slot in enumerate(self.slots) if slot.job is None and i != exclude]
        empty = [i for i in free if not self.slots[i].ids]
        return empty[0] if empty else min(free, key=lambda i: self.slots[i].used, default=None)

    def _spill(self, i: int):
        """Copy what parked slot `i` holds to the prefix store (where the budget admits it): it is to be reused."""
        slot = self.slots[i]
        if slot.ids and not self.store.holds(slot.ids):
            if self.store.admits(len(slot.ids) * self.engine.bytes_per_token):
                self.store.add(Entry(slot.ids, self.engine.export_prefix(i, len(slot.ids))))
            else:
                self.dropped += 1
        slot.ids = []
        self.metrics.evictions = self.dropped + self.store.evictions
        self.metrics.store_bytes, self.metrics.store_entries = self.store.nbytes, len(self.store.entries)

    # Prefill and decode ----------------------------------------------------------------------------------------

    def _prefill(self):
        """Feed the newcomers' prompts, oldest first: PREFILL_PIECE tokens in all while others decode (their next
        token waits for it), else the engine's own chunk."""
        budget = PREFILL_PIECE if any(slot.sampler is not None for slot in self.slots) else PREFILL_CHUNK
        newcomers = [i for i, slot in enumerate(self.slots) if slot.job is not None and slot.sampler is None]
        for i in [i for i in newcomers if self.slots[i].job.cancelled]:
            self._end(i)
        order = sorted((i for i in newcomers if self.slots[i].job is not None),
                       key=lambda i: self.slots[i].job.stats.admitted)
        for i in order:
            if budget <= 0:
                break
            slot, job = self.slots[i], self.slots[i].job
            rest = job.prompt[len(slot.ids):]
            try:
                if len(rest) > budget:
                    self.engine.prefill(i, rest[:budget])
                    slot.ids += rest[:budget]
                    budget = 0
                    continue
                budget -= len(rest)
                sampler = self._sampler(job)
                first = int(self.engine.start(i, job.prompt, sampler, keep=len(slot.ids)))
            except Exception as e:
                self._fail(i, e)
                continue
            slot.ids, slot.sampler = list(job.prompt), sampler
            job.stats.first_token = time.perf_counter()
            self._hand(i, first)

    def _sampler(self, job: Job) -> Sampler:
        model = self.engine.model
        if job.top_logprobs is None:
            return Sampler(job.params, model.args.vocab_size, device=model.device)
        return _LogprobSampler(job.params, model.args.vocab_size, model.device, job.top_logprobs)

    def _decode(self):
        try:
            drawn = self.engine.step().tolist()  # the one host sync per step: the tokens go out now
        except Exception as e:
            for i, slot in enumerate(self.slots):
                if slot.sampler is not None:
                    self._fail(i, e)
            return
        for i, slot in enumerate(self.slots):
            if slot.sampler is not None:
                slot.ids.append(slot.pending)
                self._hand(i, drawn[i])

    def _hand(self, i: int, token: int):
        """Give slot `i`'s job its new token; end the job if it is done."""
        slot = self.slots[i]
        job = slot.job
        if token == NON_FINITE:
            self._fail(i, non_finite_error(job.stats.generated + 1))
            return
        job.stats.generated += 1
        job.stats.last_token = time.perf_counter()
        logprobs = isinstance(slot.sampler, _LogprobSampler)
        self.outbox.append((job, slot.sampler.token(token) if logprobs else Token(token)))
        slot.pending = token
        if token in job.stop_ids or job.stats.generated == job.max_new_tokens or job.cancelled:
            self._end(i)

    def _send(self):
        """Hand the iteration's tokens and ends to their jobs' event loops: one wake-up of a loop per iteration, not
        one per token (each is a syscall, and a switch of threads the model's thread then waits for)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for job, item in self.outbox:
            by_loop.setdefault(job._loop, []).append((job, item))
        self.outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop has closed (a second Ctrl-C stops the server at once): nobody reads on
                for job, _ in items:
                    job.cancel()

    # Ending ----------------------------------------------------------------------------------------------------

    def _end(self, i: int, error: BaseException | None = None):
        """Slot `i`'s job is over: the slot parks, holding its cache for a later request."""
        slot = self.slots[i]
        job = slot.job
        if slot.sampler is not None:
            self.engine.finish(i)
        slot.job, slot.sampler, slot.used = None, None, time.perf_counter()
        outcome = "failed" if error is not None else "cancelled" if job.cancelled else "done"
        with self.lock:  # counted before the job's consumer hears it ended: its client then sees the slot free
            self.busy -= 1
            self.metrics.running = self.busy
        self.metrics.finished(job.stats, failed=error is not None)
        self.outbox.append((job, error))
        if self.log:
            print(job.stats.line(next(self.numbers), outcome), file=sys.stderr, flush=True)

    def _fail(self, i: int, e: Exception):
        """End slot `i`'s job with the error; the slot keeps only what its cache surely holds."""
        held = min(len(self.slots[i].ids), self.engine.length(i))
        self.engine.truncate(i, held)
        self.slots[i].ids = self.slots[i].ids[:held]
        self._end(i, e if isinstance(e, K2Error) else K2Error(f"generation failed: {type(e).__name__}: {e}"))
