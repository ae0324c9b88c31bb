"""`k2 download` against a fake hub (tests/hub_server.py) with huggingface_hub's real client: in real processes where
one is killed, interrupted, limited or reads its environment at start, else in this one through the CLI's entry point.

The oracles: the source files byte for byte, huggingface_hub's own verify_repo_checksums / snapshot_download /
hf_hub_download reading what k2 wrote, the bytes the server counted, and the pipeline's stage rule computed from the
complete checkpoint's safetensors headers.
"""
import filecmp
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from safetensors import safe_open

from runtime.errors import K2Error
from runtime.hub.download import DownloadRequest, download
from runtime.loader import load
from runtime.models.deepseek_v3_demo import write_demo
from runtime.placement import decode_bytes_per_token, model_cost, stage_layer_ranges
from tests.helpers import assert_one_line_error, run_k2_here
from tests.hub_server import FakeHub, Fault

REPO, BIG, GATED = "moonshotai/Kimi-K2-Demo", "moonshotai/Kimi-K2-Big", "moonshotai/Kimi-K2-Gated"
TOKEN = "hf_valid_token"
EXTRAS = {"modeling_kimi.py": b"raise SystemExit('remote code must never run')\n", "README.md": b"# demo\n",
          "figures/banner.png": b"\x89PNG not really\n"}
HOLD_AT = 16 << 20  # byte of the big shard where faults strike: past the client's first 10 MB chunk


def _layer_of(name: str, n_layers: int) -> int:
    if name.startswith("model.layers."):
        return int(name.split(".")[2])
    return 0 if name.startswith("model.embed_tokens.") else n_layers - 1


@pytest.fixture(scope="module")
def source(demo_dir, tmp_path_factory) -> Path:
    """The demo checkpoint resharded one shard per layer (embeddings with the first, head with the last), as many hub
    checkpoints are: then pipeline stages own disjoint shard sets."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("source")
    n_layers = json.loads((demo_dir / "config.json").read_text())["num_hidden_layers"]
    tensors = {}
    for shard in sorted(demo_dir.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    weight_map = {name: f"model-{_layer_of(name, n_layers) + 1:05d}-of-{n_layers:05d}.safetensors" for name in tensors}
    for shard in sorted(set(weight_map.values())):
        save_file({n: t for n, t in tensors.items() if weight_map[n] == shard}, folder / shard, metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": weight_map}))
    for file in demo_dir.iterdir():
        if not file.name.endswith((".safetensors", ".index.json")):
            (folder / file.name).write_bytes(file.read_bytes())
    return folder


@pytest.fixture(scope="module")
def big_source(tmp_path_factory) -> Path:
    """A demo checkpoint in one ~24 MB shard: bigger than the client's 10 MB write chunks, so a transfer stopped at
    16 MB leaves bytes on disk to resume from."""
    return write_demo(tmp_path_factory.mktemp("big") / "k2", config_overrides={"moe_intermediate_size": 512}, n_shards=1)


@pytest.fixture(scope="module")
def hub(source, big_source):
    with FakeHub(valid_tokens=(TOKEN,), tree_page_size=3) as hub:  # small pages: the listing follows Link headers
        hub.add_repo(REPO, source, extra=EXTRAS)
        hub.add_repo(BIG, big_source)
        hub.add_repo(GATED, source, gated=True)
        yield hub


@pytest.fixture
def env(hub, tmp_path, monkeypatch) -> Path:
    """A clean hub environment, caches in tmp_path, no token, online: for child processes (variables) and for this
    one (huggingface_hub read its constants at import)."""
    hub.reset_counts()
    hub.faults.clear()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("K2_HOME", str(tmp_path / "k2"))
    for var in ("HF_TOKEN", "HF_HUB_CACHE", "HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_TOKEN_PATH", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return tmp_path


def k2_download(hub: FakeHub, *args, **env) -> subprocess.CompletedProcess:
    """`k2 download ... --endpoint <fake hub>` in a child process; `env` adds variables (run_k2 clears offline mode)."""
    command = [sys.executable, "-m", "k2cli", "download", *map(str, args), "--endpoint", hub.endpoint]
    return subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, **env), timeout=120)


def cli_json(hub: FakeHub, *args) -> dict:
    result = run_k2_here("download", *map(str, args), "--endpoint", hub.endpoint, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def fetch(hub: FakeHub, repo: str, **request) -> dict:
    """The same download in this process: the library function the command calls."""
    return download(DownloadRequest(repo, endpoint=hub.endpoint, **request))


def snapshot(env: Path, repo: str, hub: FakeHub) -> Path:
    return env / "hf" / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / hub.repos[repo].commit


def same_files(folder: Path, source: Path, paths) -> bool:
    return all(filecmp.cmp(folder / p, source / p, shallow=False) for p in paths)


def all_files(source: Path) -> list[str]:
    return sorted(p.name for p in source.iterdir())


def weight_map(source: Path) -> dict[str, str]:
    return json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]


# --- what gets fetched ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["../../../../../X/climbed.safetensors", "/tmp/absolute.safetensors",
                                  "..\\..\\backslash.safetensors", "a/./../b.safetensors",
                                  "weights/C:climbed.safetensors"])
def test_a_listing_that_would_write_outside_the_folder_is_refused(hub, source, env, path):
    repo = f"evil/listing-{abs(hash(path))}"
    hub.add_repo(repo, source, extra={path: b"not a model"})
    result = run_k2_here("download", repo, "--endpoint", hub.endpoint, "--include", "*.safetensors", "--local-dir",
                         env / "out")
    assert_one_line_error(result, repr(path), "outside the download folder")
    assert sum(hub.sent.values()) == 0 and not (env / "out").exists()
    assert not [p for p in env.parent.rglob("*.safetensors") if "climbed" in p.name or "backslash" in p.name]


def test_globs_enter_folders_only_when_asked(hub, env):
    def chosen(*globs):
        return [f["path"] for f in fetch(hub, REPO, include=list(globs), dry_run=True)["files"]]

    with pytest.raises(K2Error, match="no file .* matches"):
        chosen("*.png")  # huggingface_hub's allow_patterns would take figures/banner.png
    assert chosen("*.md") == ["README.md"]
    assert chosen("**/*.png") == chosen("figures/*") == chosen("**.png") == ["figures/banner.png"]
    assert chosen("**/*.md") == ["README.md"]  # `**/` also matches no folder at all

def test_full_download_is_the_source_byte_for_byte_and_resolves_by_repo_id(hub, source, env):
    result = cli_json(hub, REPO)
    folder = snapshot(env, REPO, hub)
    expected = all_files(source)  # what k2 reads; remote code, README and figures stay behind
    assert Path(result["folder"]) == folder and sorted(f["path"] for f in result["files"]) == expected
    assert all_files(folder) == expected and same_files(folder, source, expected)
    assert result["fetched_bytes"] == sum((source / p).stat().st_size for p in expected)
    assert sum(hub.sent.values()) == result["fetched_bytes"]  # each byte crossed the wire once
    assert not hub.data_requests("modeling_kimi.py")

    # huggingface_hub itself reads k2's cache entries: hashes match the hub's, the snapshot resolves offline
    check = HfApi(endpoint=hub.endpoint).verify_repo_checksums(REPO, cache_dir=env / "hf" / "hub")
    assert check.mismatches == [] and sorted(check.missing_paths) == sorted(EXTRAS)
    assert Path(snapshot_download(REPO, cache_dir=env / "hf" / "hub", local_files_only=True)) == folder
    info = run_k2_here("info", REPO, "--json")
    assert info.returncode == 0, info.stderr
    assert Path(json.loads(info.stdout)["model"]) == folder

    hub.reset_counts()
    assert fetch(hub, REPO)["fetched_bytes"] == 0 and hub.sent == {}


def test_include_and_exclude_globs_into_a_local_dir(hub, source, env):
    only = cli_json(hub, REPO, "--local-dir", env / "json", "--include", "*.json", "--include", "*.py")
    assert sorted(f["path"] for f in only["files"]) == [
        "config.json", "generation_config.json", "model.safetensors.index.json", "modeling_kimi.py",
        "tokenizer_config.json"]
    assert (env / "json" / "modeling_kimi.py").read_bytes() == EXTRAS["modeling_kimi.py"]

    skipped = {"model-00002-of-00004.safetensors", "model-00003-of-00004.safetensors"}
    kept = fetch(hub, REPO, local_dir=env / "some", exclude=["model-0000[23]-*"])
    expected = sorted(set(all_files(source)) - skipped)
    assert sorted(f["path"] for f in kept["files"]) == expected and same_files(env / "some", source, expected)
    assert not any(hub.data_requests(shard) for shard in skipped)

    # huggingface_hub's local-dir records are k2's: its own download of a file k2 fetched sends no bytes
    hub.reset_counts()
    hf_hub_download(REPO, "config.json", local_dir=env / "some", endpoint=hub.endpoint)
    assert hub.sent == {}


def test_stages_fetch_disjoint_shards_that_hold_their_layers_and_together_all(hub, source, env):
    pipeline = stage_layer_ranges(decode_bytes_per_token(model_cost(load(source, weights=False)), ctx=4096), 2)  # from full headers
    n_layers = json.loads((source / "config.json").read_text())["num_hidden_layers"]
    shards = []
    for i, layers in enumerate(pipeline, 1):
        result = fetch(hub, REPO, stage=f"{i}/2", local_dir=env / f"stage{i}")
        assert result["part"]["layers"] == [layers.start, layers.stop - 1]
        got = {f["path"] for f in result["files"]} & set(weight_map(source).values())
        held = set()
        for shard in got:
            with safe_open(env / f"stage{i}" / shard, "pt") as f:
                held |= set(f.keys())
        assert {name for name in weight_map(source) if _layer_of(name, n_layers) in layers} <= held
        assert {"config.json", "tiktoken.model", "chat_template.jinja"} <= {f["path"] for f in result["files"]}
        shards.append(got)
    assert not shards[0] & shards[1] and shards[0] | shards[1] == set(weight_map(source).values())

    hub.reset_counts()
    plan = run_k2_here("download", REPO, "--endpoint", hub.endpoint, "--layers", "1-2", "--dry-run", "--local-dir",
                       env / "dry")
    assert plan.returncode == 0, plan.stderr
    assert "layers 1-2 of 4, 2 of 4 shards" in plan.stdout and not (env / "dry").exists()
    assert not any(path.endswith(".safetensors") for path in hub.sent)


# --- resume and verify ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["killed", "ctrl-c"])
def test_a_transfer_killed_mid_file_resumes_without_resending_what_is_on_disk(hub, big_source, env, sig):
    """Killed, or stopped with Ctrl-C: then promptly (the transfer is still held open by the server), with one line
    saying what was kept and how to resume, and exit 130."""
    shard = "model-00001-of-00001.safetensors"
    size = (big_source / shard).stat().st_size
    blobs = env / "hf" / "hub" / f"models--{BIG.replace('/', '--')}" / "blobs"
    partial = blobs / f"{hub.repos[BIG].files[shard].sha256}.incomplete"
    hub.faults[shard] = fault = Fault(after_bytes=HOLD_AT, release=threading.Event())
    child = subprocess.Popen([sys.executable, "-m", "k2cli", "download", BIG, "--endpoint", hub.endpoint],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert fault.reached.wait(60)
        deadline = time.monotonic() + 30
        while (not partial.exists() or partial.stat().st_size == 0) and time.monotonic() < deadline:
            time.sleep(0.05)  # the client writes the chunks it has whole, then waits for more
        time.sleep(0.5)
        child.send_signal(sig)
        _, stderr = child.communicate(timeout=10)
    finally:
        child.kill()
        fault.release.set()
    if sig == signal.SIGINT:
        assert child.returncode == 130
        assert stderr.decode().splitlines() == ["interrupted: the files and partial files fetched so far are "
                                                     "kept; the same command resumes them"], stderr.decode()
    kept = partial.stat().st_size
    assert 0 < kept <= HOLD_AT < size
    hub.faults.clear()
    hub.reset_counts()

    result = fetch(hub, BIG)
    assert result["resumed_bytes"] == kept and result["fetched_bytes"] == size - kept
    assert [r["range"] for r in hub.data_requests(shard)] == [f"bytes={kept}-"]
    assert hub.sent == {shard: size - kept}  # and the files finished before the kill are not sent again
    assert same_files(snapshot(env, BIG, hub), big_source, all_files(big_source))


@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
def test_a_connection_lost_mid_file_is_resumed(hub, big_source, env, reset):
    """Closed: huggingface_hub's http_get resumes it; reset (which http_get does not retry): k2 retries the file."""
    shard = "model-00001-of-00001.safetensors"
    hub.faults[shard] = Fault(after_bytes=HOLD_AT, reset=reset)  # once, then the file is served normally
    result = fetch(hub, BIG)
    requests = hub.data_requests(shard)
    assert len(requests) == 2 and requests[0]["range"] is None
    resumed_at = int(requests[1]["range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= HOLD_AT
    assert hub.sent[shard] == HOLD_AT + (big_source / shard).stat().st_size - resumed_at
    assert same_files(Path(result["folder"]), big_source, [shard])


def test_a_server_that_ignores_range_gets_the_file_again_from_the_start(hub, big_source, env, monkeypatch):
    shard = "model-00001-of-00001.safetensors"
    size = (big_source / shard).stat().st_size
    hub.faults[shard] = Fault(after_bytes=HOLD_AT)
    monkeypatch.setattr(hub, "honour_range", False)
    result = fetch(hub, BIG)  # the client rewinds its partial file; the hash must start over with it
    assert len(hub.data_requests(shard)) == 2 and hub.sent[shard] == HOLD_AT + size
    assert same_files(Path(result["folder"]), big_source, [shard])


def test_a_connection_that_keeps_failing_ends_in_one_line_and_the_next_run_completes(hub, source, env):
    shard = "model-00002-of-00004.safetensors"
    hub.faults[shard] = Fault(after_bytes=100_000, reset=True, times=100)
    failed = k2_download(hub, REPO)
    assert_one_line_error(failed, "lost", shard, "run the same command again")
    assert len(hub.data_requests(shard)) == 3
    assert not (snapshot(env, REPO, hub) / shard).exists()  # nothing partial is presented as done
    hub.faults.clear()
    fetch(hub, REPO)
    assert same_files(snapshot(env, REPO, hub), source, all_files(source))


def test_verify_finds_corrupt_and_missing_files_and_fetches_them_again(hub, source, env):
    folder = Path(fetch(hub, REPO)["folder"])
    shard = folder / "model-00003-of-00004.safetensors"
    blob = shard.resolve()
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only a hash can tell
    blob.write_bytes(bytes(data))
    (folder / "tokenizer_config.json").resolve().unlink()
    hub.reset_counts()

    plain = fetch(hub, REPO)  # without --verify a file of the right size counts as done
    assert plain["corrupt"] == [] and set(hub.sent) == {"tokenizer_config.json"}
    verified = cli_json(hub, REPO, "--verify")
    assert verified["corrupt"] == [shard.name] and shard.name not in verified["verified"]
    assert hub.sent[shard.name] == blob.stat().st_size
    assert same_files(folder, source, all_files(source))
    check = HfApi(endpoint=hub.endpoint).verify_repo_checksums(REPO, cache_dir=env / "hf" / "hub")
    assert check.mismatches == []


# --- refusals and errors --------------------------------------------------------------------------------------

def test_preflight_refuses_when_the_disk_is_short_before_fetching_anything(hub, source, env):
    request = DownloadRequest(REPO, endpoint=hub.endpoint, local_dir=env / "model")
    needed = sum(p.stat().st_size for p in source.iterdir())
    with pytest.raises(K2Error, match=rf"not enough disk space .*: 1000 B free, {needed / 2**20:.2f} MiB needed: .* short"):
        download(request, free_bytes=lambda folder: 1000)
    assert hub.sent == {} and not (env / "model").exists()

    plan = run_k2_here("download", REPO, "--endpoint", hub.endpoint, "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert "model-00004-of-00004.safetensors" in plan.stdout and "10 files" in plan.stdout and hub.sent == {}


def test_hub_errors_are_one_line(hub, env, monkeypatch):
    assert_one_line_error(k2_download(hub, GATED), "gated", "hf auth login")
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    refused = subprocess.run([sys.executable, "-m", "k2cli", "download", REPO, "--endpoint", f"http://127.0.0.1:{port}"],
                             capture_output=True, text=True, timeout=60)
    assert_one_line_error(refused, "cannot connect", "refused")
    with pytest.raises(K2Error, match="moonshotai/no-such-model not found .*hf auth login"):
        fetch(hub, "moonshotai/no-such-model")
    with pytest.raises(K2Error, match="revision 'v9' not found"):
        fetch(hub, REPO, revision="v9")
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(K2Error, match="401 Invalid credentials"):
        fetch(hub, REPO)
    assert hub.sent == {}

    (env / "hf").mkdir(exist_ok=True)
    (env / "hf" / "token").write_text(TOKEN)  # the saved login, as `hf auth login` leaves it
    monkeypatch.delenv("HF_TOKEN")
    granted = k2_download(hub, GATED)
    assert granted.returncode == 0, granted.stderr
    cdn = [r for r in hub.requests if r["path"].startswith("/cdn/")]
    assert cdn and not any(r["auth"] for r in cdn)  # the token goes to the hub, never to the CDN


def test_offline_mode_uses_what_is_on_disk_and_names_what_is_missing(hub, source, env, monkeypatch):
    shard = "model-00004-of-00004.safetensors"
    fetch(hub, REPO, exclude=[shard])
    missing = k2_download(hub, REPO, HF_HUB_OFFLINE="1")
    assert_one_line_error(missing, "HF_HUB_OFFLINE=1", "1 file(s)", shard)
    fetch(hub, REPO)
    hub.reset_counts()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    offline = fetch(hub, REPO)
    assert offline["offline"] and offline["fetched_bytes"] == 0 and hub.requests == []


@pytest.mark.parametrize("index_in_flight", [False, True], ids=["index-done", "index-in-flight"])
def test_a_full_disk_mid_file_fails_in_one_line_and_resumes(hub, big_source, env, index_in_flight):
    shard = "model-00001-of-00001.safetensors"
    if index_in_flight:  # its transfer held open until the run has failed: the run must not wait for it
        hub.faults["model.safetensors.index.json"] = held = Fault(after_bytes=0, release=threading.Event())

    def small_disk():  # files may not grow past HOLD_AT bytes in the child: a write there fails as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (HOLD_AT, HOLD_AT))

    command = [sys.executable, "-m", "k2cli", "download", BIG, "--endpoint", hub.endpoint]
    try:  # the failed run ends at once (under a second here), not after the held transfer's network timeout (~60 s)
        failed = subprocess.run(command, capture_output=True, text=True, timeout=30, preexec_fn=small_disk)
    finally:
        if index_in_flight:
            held.release.set()
    assert_one_line_error(failed, "cannot write", shard, "run the same command again to resume")
    # Files come in parallel: a small one still in flight when the shard's write failed (often the index) is fetched
    # again whole; one that was complete is not fetched again.
    folder = snapshot(env, BIG, hub)
    unfinished = {p: (big_source / p).stat().st_size for p in all_files(big_source)
                  if p != shard and not (folder / p).exists()}
    hub.reset_counts()
    result = fetch(hub, BIG)
    shard_bytes = result["fetched_bytes"] - sum(unfinished.values())
    assert 0 < result["resumed_bytes"] and hub.sent == {shard: shard_bytes, **unfinished}
    assert ("model.safetensors.index.json" in unfinished) == index_in_flight
    assert result["resumed_bytes"] + shard_bytes == (big_source / shard).stat().st_size
    assert same_files(Path(result["folder"]), big_source, [shard])
