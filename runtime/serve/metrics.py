"""What the server counts, for `GET /metrics` in Prometheus' text format (version 0.0.4: `# HELP`, `# TYPE`, then
`name value` lines), and the line it logs per request.

The worker thread writes the numbers and the event loop reads them; each is one int or float, so a reader sees each
value whole (a scrape is a snapshot of the moment, not of one instant for all of them).
"""
from dataclasses import dataclass

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class RequestStats:
    """One request's timings (time.perf_counter seconds) and token counts."""
    submitted: float = 0.0
    admitted: float = 0.0  # given a slot
    first_token: float = 0.0
    last_token: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated: int = 0

    def line(self, number: int, outcome: str) -> str:
        """The server log's line for the request: time to first token (from its arrival), prefill and decode
        speeds."""
        if not self.generated:
            return f"k2 serve: request {number}: {self.prompt_tokens} prompt tokens, no token drawn ({outcome})"
        computed = self.prompt_tokens - self.cached_tokens
        prefill_s = self.first_token - self.admitted
        decode = (f"decode {(self.generated - 1) / (self.last_token - self.first_token):.1f} tok/s"
                  if self.generated > 1 and self.last_token > self.first_token else "decode -")
        return (f"k2 serve: request {number}: {self.prompt_tokens} prompt tokens ({self.cached_tokens} cached), "
                f"first token {(self.first_token - self.submitted) * 1000:.1f} ms, prefill "
                f"{computed / prefill_s if prefill_s > 0 else 0:.1f} tok/s, {decode}, {self.generated} tokens "
                f"({outcome})")


class Metrics:
    def __init__(self, slots: int, budget_bytes: int):
        self.slots, self.budget_bytes = slots, budget_bytes
        self.requests = 0  # finished, whatever the outcome
        self.rejected = 0  # refused with a 429: the queue was full
        self.failed = 0
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.cached_tokens = 0
        self.first_token_seconds = 0.0  # summed over requests that drew one, as a Prometheus summary's _sum
        self.first_tokens = 0
        self.queued = 0
        self.running = 0  # requests holding a slot (being prefilled or decoded)
        self.store_bytes = 0
        self.store_entries = 0
        self.evictions = 0

    def finished(self, stats: RequestStats, failed: bool):
        self.requests += 1
        self.failed += failed
        self.prompt_tokens += stats.prompt_tokens
        self.cached_tokens += stats.cached_tokens
        self.generated_tokens += stats.generated
        if stats.generated:
            self.first_token_seconds += stats.first_token - stats.submitted
            self.first_tokens += 1

    def exposition(self) -> str:
        rows = [
            ("k2_requests_total", "counter", "Requests finished (completed, stopped, or left by their client).",
             self.requests),
            ("k2_requests_failed_total", "counter", "Requests whose generation failed.", self.failed),
            ("k2_requests_rejected_total", "counter", "Requests refused with 429: the queue was full.", self.rejected),
            ("k2_prompt_tokens_total", "counter", "Prompt tokens of finished requests.", self.prompt_tokens),
            ("k2_generated_tokens_total", "counter", "Tokens drawn for finished requests.", self.generated_tokens),
            ("k2_prefix_cache_hit_tokens_total", "counter", "Prompt tokens served from a cached prefix, not computed.",
             self.cached_tokens),
            ("k2_prefix_cache_evictions_total", "counter", "Cached prefixes dropped to make room.", self.evictions),
            ("k2_queue_depth", "gauge", "Requests waiting for a slot.", self.queued),
            ("k2_running_requests", "gauge", "Requests in the running batch (prefilling or decoding).", self.running),
            ("k2_slots", "gauge", "Requests the running batch holds at most (--max-batch).", self.slots),
            ("k2_prefix_cache_bytes", "gauge", "Bytes of cached prefixes copied off the slots.", self.store_bytes),
            ("k2_prefix_cache_entries", "gauge", "Cached prefixes copied off the slots.", self.store_entries),
            ("k2_prefix_cache_budget_bytes", "gauge", "The most bytes cached prefixes may take (--cache-budget).",
             self.budget_bytes),
        ]
        lines = []
        for name, kind, text, value in rows:
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        lines += ["# HELP k2_time_to_first_token_seconds From a request's arrival to its first token.",
                  "# TYPE k2_time_to_first_token_seconds summary",
                  f"k2_time_to_first_token_seconds_sum {self.first_token_seconds}",
                  f"k2_time_to_first_token_seconds_count {self.first_tokens}"]
        return "\n".join(lines) + "\n"
