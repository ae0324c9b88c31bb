"""The CPU threads a command computes with: torch's intra-op pool (the CPU kernels read its size at each call), kept on
one NUMA node where the machine has several (runtime/numa.py). Set before the model loads, so the weights land on
the node the threads run on."""
import torch

from runtime import numa


def use_threads(threads: int | None) -> list[str]:
    """Set torch's intra-op threads to `threads` (None: torch's default) and place them; one-line notes for the user.

    More threads than the process has CPUs is allowed (measuring oversubscription is legitimate) but warned about:
    torch's threads then take turns on the cores, and decode, which waits on the slowest thread, slows down."""
    notes = []
    if threads is not None:
        cpus = len(numa.allowed_cpus())
        if threads > cpus:
            notes.append(f"warning: --threads {threads} is more than the {cpus} CPUs this process may run on: threads "
                         f"will take turns on the cores (usually slower)")
        torch.set_num_threads(threads)
    note = numa.keep_on_one_node(torch.get_num_threads())
    return notes + [f"note: {note}"] if note else notes
