"""`k2 download`: list, check, fetch and verify the files of a model repo, resumably.

One run: the revision's listing (offline: the listing an earlier run saved) -> the files k2 needs, or one stage's
-> what is on disk already (hashed when --verify asks, or when nothing records where a file came from) -> a preflight
that refuses when the disk cannot hold what is missing -> the transfers, each file verified against the hub's hash
before it moves into place -> the revision recorded, so `k2 info REPO` finds the folder.
"""
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout
from huggingface_hub import constants

from runtime.errors import K2Error
from runtime.hub.remote import Hub, Listing, save_listing, saved_listing
from runtime.hub.selection import parse_layers, parse_stage, select_paths, shards_for_layers, stage_layers
from runtime.hub.store import CHECK, DONE, MISSING, CacheStore, FileState, LocalDirStore
from runtime.hub.transfer import Meter, fetch, hash_file, run_all
from runtime.units import format_shortfall

INDEX = "model.safetensors.index.json"


@dataclass
class DownloadRequest:
    repo_id: str
    revision: str = "main"
    include: list[str] | None = None  # replaces the default selection
    exclude: list[str] | None = None
    local_dir: Path | None = None  # default: the Hugging Face cache (HF_HUB_CACHE)
    endpoint: str | None = None  # default: HF_ENDPOINT
    workers: int = 8
    stage: str | None = None  # "I/N"
    layers: str | None = None  # "A-B"
    verify: bool = False
    dry_run: bool = False
    progress: bool = False


def existing_parent(path: Path) -> Path:
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return path


def disk_free(path: Path) -> int:
    """Free bytes on the file system that holds `path`, or will once it is created."""
    return shutil.disk_usage(existing_parent(path)).free


def _read_json(hub: Hub | None, listing: Listing, store, path: str) -> dict:
    """A small file the selection depends on: from disk when it is there, else fetched into memory."""
    file = listing.files.get(path)
    if file is None:
        raise K2Error(f"{listing.repo_id} has no {path}, which --stage and --layers read to pick the shards")
    if store.state(file).status == DONE:
        return json.loads(store.content_path(file).read_text())
    if hub is None:
        raise K2Error(f"HF_HUB_OFFLINE=1 and {path} of {listing.repo_id} is not on disk; --stage and --layers "
                      "need it: unset HF_HUB_OFFLINE")
    return json.loads(hub.read(listing, file))


def choose_files(req: DownloadRequest, listing: Listing, hub: Hub | None, store) -> tuple[list[str], dict | None]:
    """The paths to fetch and, for --stage / --layers, the layers and shards they stand for."""
    paths = select_paths(listing.files, req.include, req.exclude)
    if req.stage is None and req.layers is None:
        return paths, None
    if req.stage is not None and req.layers is not None:
        raise K2Error("pass --stage or --layers, not both")
    stage = parse_stage(req.stage) if req.stage is not None else None
    layers = parse_layers(req.layers) if req.layers is not None else None
    config = _read_json(hub, listing, store, "config.json")
    n_layers = config.get("num_hidden_layers")
    if not isinstance(n_layers, int):
        raise K2Error(f"config.json of {listing.repo_id} has no num_hidden_layers")
    if stage is not None:
        layers = stage_layers(config, *stage)
    weight_map = _read_json(hub, listing, store, INDEX).get("weight_map") or {}
    wanted, shards = shards_for_layers(weight_map, layers, n_layers), set(weight_map.values())
    part = {"layers": [layers.start, layers.stop - 1], "num_layers": n_layers, "shards": sorted(wanted),
            "num_shards": len(shards)}
    if stage is not None:
        part.update(stage=stage[0] + 1, stages=stage[1])
    return [p for p in paths if p not in shards or p in wanted], part


def _check(states: list[FileState], store, req: DownloadRequest) -> list[str]:
    """Hash files in place: a match counts as done (and is recorded), a mismatch is deleted to be fetched again
    (left alone on a dry run). Returns the paths that did not match."""
    corrupt = []
    meter = Meter(sum(s.file.size for s in states), 0, "verifying", req.progress and bool(states))

    def check(state: FileState):
        if hash_file(store.content_path(state.file), state.file, meter).hexdigest() == state.file.etag:
            state.status = DONE
            return
        corrupt.append(state.file.path)
        if not req.dry_run:
            store.discard(state.file)
        state.status, state.have = MISSING, 0

    try:
        run_all(states, check, req.workers, meter)
    finally:
        meter.close()
    return sorted(corrupt)


def _model_arg(req: DownloadRequest, store, part: dict | None) -> str:
    """What to pass other commands as MODEL: the repo id when the cache resolves it to this complete folder."""
    if isinstance(store, CacheStore) and req.revision == constants.DEFAULT_REVISION and part is None:
        return req.repo_id
    return str(store.folder)


def download(req: DownloadRequest, free_bytes=disk_free) -> dict:
    """Fetch (with dry_run: only plan) what `req` asks for; returns what was found and done, for the CLI to print.

    `free_bytes(folder)` answers the preflight's free-space question; tests pass a stand-in for a full disk.
    """
    start = time.perf_counter()
    offline = constants.is_offline_mode()
    hub = None if offline else Hub(req.repo_id, req.endpoint)
    listing = saved_listing(req.repo_id, req.revision) if offline else hub.listing(req.revision)
    store = LocalDirStore(req.local_dir, listing.commit) if req.local_dir is not None else \
        CacheStore(constants.HF_HUB_CACHE, req.repo_id, listing.commit)
    paths, part = choose_files(req, listing, hub, store)
    if not paths:
        raise K2Error(f"no file of {req.repo_id} matches --include / --exclude")
    states = [store.state(listing.files[p]) for p in paths]
    to_hash = [s for s in states if s.status == CHECK or (req.verify and s.status == DONE)]
    corrupt = _check(to_hash, store, req)
    missing = [s for s in states if s.status != DONE]
    result = {
        "repo_id": req.repo_id, "revision": req.revision, "commit": listing.commit, "folder": str(store.folder),
        "model": _model_arg(req, store, part), "part": part, "offline": offline, "dry_run": req.dry_run,
        "files": [{"path": s.file.path, "size": s.file.size, "status": s.status, "have": s.have} for s in states],
        "total_bytes": sum(s.file.size for s in states), "missing_bytes": sum(s.needed for s in missing),
        "verified": sorted(s.file.path for s in to_hash if s.file.path not in corrupt), "corrupt": corrupt,
        "free_bytes": free_bytes(store.folder),
    }
    if req.dry_run:
        return result
    if offline and missing:
        names = ", ".join(s.file.path for s in missing[:4])
        names += f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        raise K2Error(f"HF_HUB_OFFLINE=1 and {len(missing)} file(s) of {req.repo_id} are not in {store.folder}: "
                      f"{names}; unset HF_HUB_OFFLINE to download them")
    if result["free_bytes"] < result["missing_bytes"]:
        raise K2Error(f"not enough disk space in {existing_parent(store.folder)} for what {req.repo_id} still needs: "
                      f"{format_shortfall(result['missing_bytes'], result['free_bytes'])}; free some space or choose "
                      "another --local-dir")
    if not offline:
        save_listing(listing)
    result["fetched_bytes"] = _transfer(req, hub, listing, store, states)
    result["resumed_bytes"] = sum(s.have for s in missing)
    store.finish(req.revision)
    result["seconds"] = time.perf_counter() - start
    return result


def _transfer(req: DownloadRequest, hub: Hub | None, listing: Listing, store, states: list[FileState]) -> int:
    """Fetch what is missing, under a lock on the destination; returns the bytes written."""
    store.lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(store.lock_path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise K2Error(f"another k2 download is writing to {store.folder} (lock {store.lock_path})") from None
    try:
        missing = [s for s in states if s.status != DONE]
        for state in states:
            if state.status == DONE:
                store.link(state.file)  # a blob another revision fetched, or a file just hashed
        total = sum(s.file.size for s in states)
        meter = Meter(total, total - sum(s.needed for s in missing), req.repo_id, req.progress)

        def work(state: FileState):
            partial = store.partial_path(state.file)
            fetch(hub, listing, state.file, partial, meter)
            store.place(state.file, partial)

        try:
            run_all(missing, work, req.workers, meter)
        finally:
            meter.close()
        return meter.transferred
    finally:
        lock.release()
