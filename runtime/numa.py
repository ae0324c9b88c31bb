"""NUMA nodes of this machine (Linux sysfs: each node's CPUs and memory), and keeping a process's threads on one.

Decode reads every weight once per token, so it runs at memory bandwidth; a thread reading memory attached to another
node crosses the socket interconnect at a fraction of local speed. Linux places a page on the node of the thread that
first touches it, so confining the process to one node before the weights load keeps the threads and the weights
together. torch has one pool of intra-op threads, so splitting the work per node (llama.cpp's --numa distribute) is
beyond a pure-Python process: k2 keeps the threads on one node when they fit in it, and otherwise leaves them be.
"""
import os
import re
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import K2Error
from runtime.units import format_bytes

SYSFS_NODES = Path("/sys/devices/system/node")
_RANGE = re.compile(r"(\d+)(?:-(\d+))?")
_MEMINFO = re.compile(r"Node\s+\d+\s+(MemTotal|MemFree):\s+(\d+)\s+kB")


@dataclass(frozen=True)
class Node:
    node: int
    cpus: tuple[int, ...]
    memory_bytes: int | None  # None where the node's meminfo is missing
    free_bytes: int | None

    def as_dict(self) -> dict:
        return {"node": self.node, "cpus": list(self.cpus), "memory_bytes": self.memory_bytes,
                "free_bytes": self.free_bytes}


def parse_id_list(text: str, source: str = "a CPU list") -> list[int]:
    """Linux's list format, as sysfs writes cpulist: '0-3,8-11' -> [0, 1, 2, 3, 8, 9, 10, 11]; '' -> []."""
    ids = []
    for part in filter(None, text.strip().split(",")):
        match = _RANGE.fullmatch(part)
        if not match:
            raise K2Error(f"{source}: cannot read {text.strip()!r} as a list of ids such as 0-3,8-11")
        first, last = int(match[1]), int(match[2] or match[1])
        ids.extend(range(first, last + 1))
    return sorted(set(ids))


def format_id_list(ids) -> str:
    """[0, 1, 2, 5] -> '0-2,5' (the format parse_id_list reads)."""
    ids = sorted(ids)
    out, start = [], None
    for i, e in enumerate(ids):
        if start is None:
            start = e
        if i + 1 == len(ids) or ids[i + 1] != e + 1:
            out.append(f"{start}-{e}" if e != start else str(e))
            start = None
    return ",".join(out)


def _meminfo(path: Path) -> dict[str, int]:
    if not path.exists():
        return {}
    return {key: int(kib) * 1024 for key, kib in _MEMINFO.findall(path.read_text())}


def nodes(root: Path = SYSFS_NODES) -> list[Node]:
    """The machine's NUMA nodes by id; empty where the OS reports none (not Linux, or a kernel built without NUMA)."""
    found = []
    for folder in root.glob("node*"):
        if not folder.name[4:].isdigit():
            continue
        cpulist = folder / "cpulist"
        cpus = parse_id_list(cpulist.read_text(), str(cpulist)) if cpulist.exists() else []
        memory = _meminfo(folder / "meminfo")
        found.append(Node(int(folder.name[4:]), tuple(cpus), memory.get("MemTotal"), memory.get("MemFree")))
    return sorted(found, key=lambda n: n.node)


def allowed_cpus() -> set[int]:
    """The CPUs this process may run on (its affinity: taskset, cgroups), or all of them where the OS does not say."""
    if hasattr(os, "sched_getaffinity"):
        return os.sched_getaffinity(0)
    return set(range(os.cpu_count() or 1))


def describe(found: list[dict]) -> str:
    """One line for people from the nodes' as_dict(): '2 NUMA nodes: 0 (CPUs 0-3,8-11, 64.00 GiB), 1 (...)'."""
    if not found:
        return "NUMA: not reported by this OS (one memory domain assumed)"

    def one(n: dict) -> str:
        memory = f", {format_bytes(n['memory_bytes'])}" if n["memory_bytes"] is not None else ""
        return f"{n['node']} (CPUs {format_id_list(n['cpus']) or 'none'}{memory})"
    return f"{len(found)} NUMA node{'s' if len(found) > 1 else ''}: " + ", ".join(map(one, found))


def choose_cpus(found: list[Node], allowed: set[int], threads: int) -> tuple[set[int] | None, str | None]:
    """Where `threads` intra-op threads should run: the allowed CPUs of the node with the most free memory among the
    nodes that have `threads` of them (the weights about to load land there), with a note saying so; (None, note)
    when no node fits them; (None, None) when the allowed CPUs lie on one node, so there is nothing to choose."""
    reach = [(n, set(n.cpus) & allowed) for n in found if set(n.cpus) & allowed]
    if len(reach) <= 1:
        return None, None
    fitting = [(n, cpus) for n, cpus in reach if len(cpus) >= threads]
    if not fitting:
        largest = max(len(cpus) for _, cpus in reach)
        return None, (f"{threads} threads span NUMA nodes {format_id_list(n.node for n, _ in reach)}: not pinned "
                      f"(--threads {largest} or fewer keeps the threads and the weights on one node)")
    node, cpus = max(fitting, key=lambda pair: (pair[0].free_bytes or 0, -pair[0].node))
    free = f", {format_bytes(node.free_bytes)} free" if node.free_bytes is not None else ""
    return cpus, (f"pinned {threads} thread{'s' if threads > 1 else ''} to NUMA node {node.node} (CPUs "
                  f"{format_id_list(cpus)}{free}); the weights load into its memory while it has room")


def pin_threads(cpus: set[int]):
    """Confine every thread of this process to `cpus`; threads started later inherit it. (sched_setaffinity on pid 0
    moves the calling thread only, and torch's thread pool may already be running.)"""
    for task in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(task), cpus)
        except ProcessLookupError:  # the thread ended since the listing
            continue


def keep_on_one_node(threads: int, root: Path = SYSFS_NODES) -> str | None:
    """Pin the process to one NUMA node when `threads` fit in one (see choose_cpus); a note of what was done, or
    None on a machine with one node."""
    cpus, note = choose_cpus(nodes(root), allowed_cpus(), threads)
    if cpus is not None:
        pin_threads(cpus)
    return note
