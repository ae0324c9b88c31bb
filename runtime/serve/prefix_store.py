"""Finished requests' caches, kept on the host within a byte budget, so that a later request beginning the same way
(an agent's next turn, which resends the whole history; another client with the same system prompt) copies that
beginning into its slot instead of computing it again.

An entry is the token ids a cache holds and that cache's rows (per layer [n, width], what `Engine.export_prefix`
gives). A request reuses the entry sharing the longest beginning with its prompt. Entries that begin another entry
hold nothing it does not, so adding one drops them; past the budget the least recently used entries go.
"""
from collections import OrderedDict
from dataclasses import dataclass

import torch

from runtime.session import common_prefix


@dataclass
class Entry:
    ids: list[int]
    rows: dict[int, torch.Tensor]  # layer -> [len(ids), width], on the host

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.rows.values())


class PrefixStore:
    """At most `budget_bytes` of cache rows; `evictions` counts entries dropped for room."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.entries: OrderedDict[int, Entry] = OrderedDict()  # by id(entry), least recently used first
        self.nbytes = 0
        self.evictions = 0

    def longest(self, ids: list[int]) -> tuple[Entry | None, int]:
        """The entry sharing the longest beginning with `ids`, and how many ids it shares (None, 0 if none)."""
        best, shared = None, 0
        for entry in self.entries.values():
            n = common_prefix(entry.ids, ids)
            if n > shared:
                best, shared = entry, n
        return best, shared

    def use(self, entry: Entry):
        """Mark `entry` used now (if it is still kept: making room for another may have dropped it)."""
        if id(entry) in self.entries:
            self.entries.move_to_end(id(entry))

    def admits(self, nbytes: int) -> bool:
        return nbytes <= self.budget_bytes

    def holds(self, ids: list[int]) -> bool:
        """Whether an entry begins with all of `ids` (then adding them would keep nothing new)."""
        return any(len(e.ids) >= len(ids) and e.ids[:len(ids)] == ids for e in self.entries.values())

    def add(self, entry: Entry):
        """Keep `entry` (which the budget must admit), dropping the entries it begins with and then, least recently
        used first, as many others as its room takes."""
        for key, old in list(self.entries.items()):
            if len(old.ids) <= len(entry.ids) and entry.ids[:len(old.ids)] == old.ids:
                self._drop(key)
        while self.nbytes + entry.nbytes > self.budget_bytes:
            self._drop(next(iter(self.entries)))
            self.evictions += 1
        self.entries[id(entry)] = entry
        self.nbytes += entry.nbytes

    def _drop(self, key: int):
        self.nbytes -= self.entries.pop(key).nbytes
