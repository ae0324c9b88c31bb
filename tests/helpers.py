import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


def run_k2(*args: str, home: Path | None = None) -> subprocess.CompletedProcess:
    """The real `k2` command in a child process, as a user runs it."""
    env = dict(os.environ, K2_HOME=str(home)) if home else dict(os.environ)
    env.pop("HF_HUB_OFFLINE", None)
    return subprocess.run([sys.executable, "-m", "k2cli", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300)


def run_k2_here(*args: str, home: Path | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    """`k2` run in this process through the same entry point and error handler as the installed script: for every
    run that needs no process of its own (no signal, no peak memory, no second rank), where a child process would
    spend most of its time importing torch. `input` is piped on stdin. Same result shape as run_k2. What a command
    sets for its process (torch's threads, by --threads) is put back afterwards."""
    import contextlib
    import io

    import torch

    from k2cli.main import main

    out, err = io.StringIO(), io.StringIO()
    saved, threads, stdin = os.environ.get("K2_HOME"), torch.get_num_threads(), sys.stdin
    if home:
        os.environ["K2_HOME"] = str(home)
    if input is not None:
        sys.stdin = io.StringIO(input)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main([str(a) for a in args])
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.stdin = stdin
        torch.set_num_threads(threads)
        if home:
            if saved is None:
                os.environ.pop("K2_HOME")
            else:
                os.environ["K2_HOME"] = saved
    return subprocess.CompletedProcess(["k2", *map(str, args)], code, out.getvalue(), err.getvalue())


def lscpu_nodes() -> dict[int, list[int]]:
    """This machine's CPUs by NUMA node, as util-linux's lscpu reports them (skips the test where it is missing)."""
    import pytest

    if not shutil.which("lscpu"):
        pytest.skip("lscpu (util-linux) is not installed")
    rows = subprocess.run(["lscpu", "-p=CPU,NODE"], capture_output=True, text=True, check=True).stdout
    by_node: dict[int, list[int]] = {}
    for line in rows.splitlines():
        if not line.startswith("#"):
            cpu, node = line.split(",")
            by_node.setdefault(int(node or 0), []).append(int(cpu))
    return by_node


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str):
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def stored_tensors(folder: Path) -> dict:
    """Every tensor of a checkpoint's shards, read with the safetensors library."""
    from safetensors import safe_open

    tensors = {}
    for shard in sorted(folder.glob("model-*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def experts_loop(experts, x, weights, ids):
    """Routed experts as the obvious loop over the experts hit, from their stacked [E, out, in] weights: the oracle of
    the grouped and fused paths. x [N, dim], weights and ids [N, k]; ids < 0 are skipped."""
    import torch
    import torch.nn.functional as F

    y = torch.zeros_like(x)
    flat = ids.flatten()
    for e in torch.bincount(flat[flat >= 0], minlength=experts.gate_proj.shape[0]).nonzero().flatten().tolist():
        token, slot = (ids == e).nonzero(as_tuple=True)
        xe = x[token]
        gate, up, down = experts.gate_proj[e], experts.up_proj[e], experts.down_proj[e]
        out = F.linear(F.silu(F.linear(xe, gate)) * F.linear(xe, up), down)
        y.index_add_(0, token, (out * weights[token, slot, None]).to(y.dtype))
    return y


def generate(model, prompts: list[list[int]], max_new_tokens: int, samplers=None, stop_ids=(),
             decoder: str = "eager") -> list[list[int]]:
    """New ids per prompt from the engine (greedy unless `samplers` says otherwise), each prompt in its own slot,
    decoded together; each ends at (and includes) its first stop id, or after `max_new_tokens`."""
    from runtime.engine import Engine
    from runtime.sampling import Sampler

    engine = Engine(model, len(prompts), max(map(len, prompts)) + max_new_tokens, decoder)
    samplers = samplers or [Sampler.greedy(model.args.vocab_size, model.device) for _ in prompts]
    outputs = [[int(engine.start(slot, prompt, sampler))] for slot, (prompt, sampler) in
               enumerate(zip(prompts, samplers))]
    for slot, out in enumerate(outputs):
        if out[-1] in stop_ids or max_new_tokens == 1:
            engine.finish(slot)
    while any(s is not None for s in engine.samplers):
        ids = engine.step().tolist()
        for slot, out in enumerate(outputs):
            if engine.samplers[slot] is not None:
                out.append(ids[slot])
                if ids[slot] in stop_ids or len(out) == max_new_tokens:
                    engine.finish(slot)
    return outputs
