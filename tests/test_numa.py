"""NUMA nodes read from sysfs (fake multi-node trees, and this machine against lscpu), where threads are pinned, and
--threads on the commands that run a model."""
import json
import os
import threading

import pytest
import torch

from runtime import numa
from runtime.errors import K2Error
from runtime.threads import use_threads
from tests.helpers import assert_one_line_error, lscpu_nodes, run_k2_here

GIB_KB = 1 << 20  # meminfo counts kB


def fake_node(root, node: int, cpulist: str, total_kb: int | None = None, free_kb: int | None = None):
    folder = root / f"node{node}"
    folder.mkdir(parents=True)
    (folder / "cpulist").write_text(cpulist + "\n")
    if total_kb is not None:  # the kernel's own layout, with the fields k2 does not read around them
        (folder / "meminfo").write_text(f"Node {node} MemTotal:       {total_kb} kB\n"
                                        f"Node {node} MemFree:        {free_kb} kB\n"
                                        f"Node {node} MemUsed:        {total_kb - free_kb} kB\n"
                                        f"Node {node} HugePages_Total:     0\n")


@pytest.fixture
def two_sockets(tmp_path):
    """Two nodes of 8 CPUs each, hyperthreads interleaved as on real two-socket machines; node 1 has more free."""
    root = tmp_path / "node"
    fake_node(root, 0, "0-3,8-11", 64 * GIB_KB, 10 * GIB_KB)
    fake_node(root, 1, "4-7,12-15", 64 * GIB_KB, 40 * GIB_KB)
    for other in ("online", "possible", "has_cpu"):  # sysfs's files beside the nodes
        (root / other).write_text("0-1\n")
    (root / "power").mkdir()
    return root


@pytest.fixture
def restore_threads():
    threads, affinity = torch.get_num_threads(), os.sched_getaffinity(0)
    yield
    torch.set_num_threads(threads)
    numa.pin_threads(affinity)


@pytest.mark.parametrize("text, ids", [("0-3,8-11", [0, 1, 2, 3, 8, 9, 10, 11]), ("0", [0]), ("", []),
                                       ("5,1-2\n", [1, 2, 5]), ("0-63", list(range(64)))])
def test_parse_id_list_reads_sysfs_cpulists(text, ids):
    assert numa.parse_id_list(text) == ids
    assert numa.parse_id_list(numa.format_id_list(ids)) == ids


@pytest.mark.parametrize("text", ["0-", "a", "1;2", "0-3:2"])
def test_malformed_cpulist_is_an_error_naming_it(text):
    with pytest.raises(K2Error, match="cpulist"):
        numa.parse_id_list(text, "node0/cpulist")


def test_nodes_of_a_two_socket_tree(two_sockets):
    found = numa.nodes(two_sockets)
    assert [n.node for n in found] == [0, 1]
    assert found[0].cpus == (0, 1, 2, 3, 8, 9, 10, 11) and found[1].cpus == (4, 5, 6, 7, 12, 13, 14, 15)
    assert (found[1].memory_bytes, found[1].free_bytes) == (64 << 30, 40 << 30)
    assert numa.describe([n.as_dict() for n in found]) == \
        "2 NUMA nodes: 0 (CPUs 0-3,8-11, 64.00 GiB), 1 (CPUs 4-7,12-15, 64.00 GiB)"


def test_memory_only_node_and_missing_meminfo(tmp_path):
    """A CXL memory expander is a node without CPUs; a node without meminfo still counts."""
    fake_node(tmp_path, 0, "0-1")
    fake_node(tmp_path, 2, "", 256 * GIB_KB, 256 * GIB_KB)
    found = numa.nodes(tmp_path)
    assert [(n.node, n.cpus, n.memory_bytes) for n in found] == [(0, (0, 1), None), (2, (), 256 << 30)]
    assert numa.choose_cpus(found, {0, 1}, threads=2) == (None, None)  # one node has the CPUs: nothing to choose


def test_no_sysfs_nodes(tmp_path):
    assert numa.nodes(tmp_path / "absent") == []
    assert "not reported" in numa.describe([])


def test_threads_that_fit_go_to_the_node_with_most_free_memory(two_sockets):
    found = numa.nodes(two_sockets)
    cpus, note = numa.choose_cpus(found, set(range(16)), threads=8)
    assert cpus == {4, 5, 6, 7, 12, 13, 14, 15}
    assert note.startswith("pinned 8 threads to NUMA node 1 (CPUs 4-7,12-15, 40.00 GiB free)")
    # Affinity set from outside (taskset) counts: node 1 keeps 2 allowed CPUs, node 0 has the 4 the threads need.
    cpus, note = numa.choose_cpus(found, {0, 1, 2, 3, 4, 5}, threads=4)
    assert cpus == {0, 1, 2, 3} and "node 0" in note


def test_threads_over_one_node_stay_unpinned_and_say_why(two_sockets):
    cpus, note = numa.choose_cpus(numa.nodes(two_sockets), set(range(16)), threads=12)
    assert cpus is None
    assert note == "12 threads span NUMA nodes 0-1: not pinned (--threads 8 or fewer keeps the threads and the " \
                   "weights on one node)"


def test_process_already_on_one_node_is_left_alone(two_sockets):
    assert numa.choose_cpus(numa.nodes(two_sockets), {4, 5, 6}, threads=8) == (None, None)


def test_pinning_moves_every_thread_of_the_process(tmp_path, restore_threads):
    """Threads that run already (torch's pool, a server's worker) move too, not just the calling one."""
    first = min(os.sched_getaffinity(0))
    fake_node(tmp_path, 0, str(first), 1 * GIB_KB, 1 * GIB_KB)
    fake_node(tmp_path, 1, "1000-1001", 1 * GIB_KB, 0)  # CPUs this process may not use: a node out of reach
    fake_node(tmp_path, 2, str(first), 1 * GIB_KB, 0)  # a second node in reach makes the choice real
    started, stop = threading.Event(), threading.Event()
    worker = threading.Thread(target=lambda: (started.set(), stop.wait()))
    worker.start()
    started.wait()
    try:
        note = numa.keep_on_one_node(1, tmp_path)
        assert note.startswith(f"pinned 1 thread to NUMA node 0 (CPUs {first},")
        assert os.sched_getaffinity(0) == os.sched_getaffinity(worker.native_id) == {first}
    finally:
        stop.set()
        worker.join()


def test_this_machine_matches_lscpu():
    assert {n.node: list(n.cpus) for n in numa.nodes()} == lscpu_nodes()


def test_one_node_machine_is_a_no_op(restore_threads):
    if len({n.node for n in numa.nodes() if set(n.cpus) & os.sched_getaffinity(0)}) > 1:
        pytest.skip("this machine has several NUMA nodes")
    affinity = os.sched_getaffinity(0)
    assert use_threads(1) == []
    assert torch.get_num_threads() == 1 and os.sched_getaffinity(0) == affinity


def test_more_threads_than_cpus_warns_and_still_sets_them(restore_threads):
    too_many = len(os.sched_getaffinity(0)) + 1
    notes = use_threads(too_many)
    assert notes[0].startswith(f"warning: --threads {too_many} is more than the {too_many - 1} CPUs")
    assert torch.get_num_threads() == too_many


def test_generate_sets_threads_before_the_model_runs(demo_dir, restore_threads, monkeypatch):
    seen = []
    from runtime import engine
    start = engine.Engine.start

    def recording_start(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return start(self, *args, **kwargs)
    monkeypatch.setattr(engine.Engine, "start", recording_start)
    torch.set_num_threads(2)
    result = run_k2_here("generate", demo_dir, "-n", "2", "--threads", "1")
    assert result.returncode == 0, result.stderr
    assert seen == [1]


@pytest.mark.parametrize("command", ["chat", "generate", "serve", "bench", "check"])
def test_threads_below_one_is_a_usage_error(command, tmp_path):
    result = run_k2_here(command, tmp_path / "missing", "--threads", "0")
    assert_one_line_error(result, "--threads")
    assert result.returncode == 2


def test_plan_reports_this_machines_nodes(demo_dir):
    result = run_k2_here("plan", demo_dir, "--cpu-mem", "8G", "--json")
    assert result.returncode == 0, result.stderr
    assert {n["node"]: n["cpus"] for n in json.loads(result.stdout)["numa_nodes"]} == lscpu_nodes()
    table = run_k2_here("plan", demo_dir, "--cpu-mem", "8G")
    assert table.stdout.splitlines()[-1].startswith(f"this machine: {len(lscpu_nodes())} NUMA node")
