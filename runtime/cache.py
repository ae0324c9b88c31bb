"""The KV cache every architecture uses: per layer one buffer of `width` values per token, in rows called slots.

A slot holds one sequence and has its own length, so sequences of different lengths share a batch without padding,
and a sequence joins (prefill into a free slot) or leaves between decode steps. What a token's `width` values are is
the architecture's business (MLA: its compressed latent; GQA: keys and values of its KV heads).

Each buffer has one column past `max_len`: a decode step writes the rows that are not running there, so a step
over every slot keeps fixed shapes without touching any sequence's tokens. Each layer's buffer lives on that
layer's device, and a pipeline stage holds buffers for its own layers only.
"""
import torch


class SlotCache:
    def __init__(self, layer_devices: dict[int, torch.device], batch: int, max_len: int, width: int,
                 dtype: torch.dtype):
        self.buffers = {i: torch.zeros(batch, max_len + 1, width, dtype=dtype, device=device)
                        for i, device in layer_devices.items()}
        self.max_len = max_len
        self.lengths = torch.zeros(batch, dtype=torch.long)  # tokens held per slot, on the host: the truth
        self.first_row = 0  # of the whole cache, for a view of some of its rows

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    def layer(self, i: int) -> torch.Tensor:
        return self.buffers[i]  # [B, max_len + 1, width], written in place

    def rows(self, start: int, n: int = 1) -> "SlotCache":
        """Slots start..start+n-1 as a cache of their own that shares the buffers and the lengths (views)."""
        view = SlotCache.__new__(SlotCache)
        view.buffers = {i: t[start:start + n] for i, t in self.buffers.items()}
        view.max_len, view.lengths, view.first_row = self.max_len, self.lengths[start:start + n], self.first_row + start
        return view
