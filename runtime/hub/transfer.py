"""Fetch files resumably and verifiably, several at once, under one progress bar.

Bytes are hashed as they arrive (the hash of a resumed file starts over the bytes already on disk), so a file is
verified the moment its last byte lands: no re-read of a 16 GB shard at 99 %.
"""
import threading
import time
from pathlib import Path

from tqdm import tqdm

from runtime.errors import K2Error
from runtime.files import NO_SPACE
from runtime.hub.remote import ConnectionLost, Hub, Listing, RemoteFile

READ_BLOCK = 8 << 20
ATTEMPTS = 3  # per file, each resuming from what the previous one left on disk


class Stopped(Exception):
    """Another file failed or the user interrupted: stop writing, keep what is on disk."""


class Meter:
    """One progress bar over every file, updated from every worker thread."""

    def __init__(self, total: int, initial: int, desc: str, show: bool):
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1000,
                        disable=not show, dynamic_ncols=True)
        self.lock = threading.Lock()
        self.transferred = 0  # bytes written by this run
        self.stop = threading.Event()

    def add(self, n: int):
        with self.lock:
            self.transferred += n
            self.bar.update(n)

    def close(self):
        self.bar.close()


def hash_file(path: Path, file: RemoteFile, meter: Meter | None = None, limit: int | None = None):
    """The content hash of the first `limit` bytes of `path` (all of it by default)."""
    hasher = file.new_hash()
    left = path.stat().st_size if limit is None else limit
    with path.open("rb") as f:
        while left > 0:
            if meter and meter.stop.is_set():
                raise Stopped()
            block = f.read(min(READ_BLOCK, left))
            if not block:
                break
            hasher.update(block)
            left -= len(block)
            if meter:
                meter.add(len(block))
    return hasher


class _HashingWriter:
    """The file object http_get writes to: appends to the partial file, hashes and counts what lands on disk."""

    def __init__(self, f, path: Path, file: RemoteFile, hasher, meter: Meter):
        self.f, self.path, self.file, self.hasher, self.meter = f, path, file, hasher, meter

    def write(self, chunk: bytes) -> int:
        if self.meter.stop.is_set():
            raise Stopped()
        self.f.write(chunk)  # buffered: writes it all or raises (a raw write may stop short at a full disk)
        self.hasher.update(chunk)
        self.meter.add(len(chunk))
        return len(chunk)

    def tell(self) -> int:
        return self.f.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.f.seek(offset, whence)

    def truncate(self, size: int | None = None) -> int:
        """http_get rewinds when a server ignores Range and resends the whole file: rehash what is left."""
        before = self.f.tell() if size is None else size
        dropped = self.path.stat().st_size - before
        size = self.f.truncate(size)
        self.hasher = hash_file(self.path, self.file, limit=size)
        self.meter.add(-dropped)
        return size


def fetch(hub: Hub, listing: Listing, file: RemoteFile, partial: Path, meter: Meter):
    """Bring `partial` to the whole file and check its hash; a mismatch deletes it. A lost connection is retried
    from the bytes on disk: huggingface_hub resumes dropped connections and timeouts itself, not resets."""
    for attempt in range(ATTEMPTS):
        try:
            return _fetch_once(hub, listing, file, partial, meter)
        except ConnectionLost:
            if attempt == ATTEMPTS - 1 or meter.stop.is_set():
                raise
            time.sleep(2 ** attempt)


def _fetch_once(hub: Hub, listing: Listing, file: RemoteFile, partial: Path, meter: Meter):
    location = hub.location(listing, file)  # again for each attempt: a CDN's signed URL may have expired
    partial.parent.mkdir(parents=True, exist_ok=True)
    have = partial.stat().st_size if partial.exists() else 0
    if have > file.size:  # not a prefix of this file
        partial.unlink()
        meter.add(-have)
        have = 0
    hasher = hash_file(partial, file, limit=have) if have else file.new_hash()
    try:
        with partial.open("ab") as f:
            writer = _HashingWriter(f, partial, file, hasher, meter)
            hub.fetch(listing, file, location, writer, resume_size=have)
    except OSError as e:
        if e.errno in NO_SPACE:
            kept = partial.stat().st_size if partial.exists() else 0
            raise K2Error(f"cannot write {file.path} in {partial.parent} ({e.strerror}): {kept:,} of its "
                          f"{file.size:,} bytes are kept; free some space and run the same command again to "
                          "resume") from None
        raise
    digest = writer.hasher.hexdigest()
    if digest != file.etag:
        partial.unlink()
        raise K2Error(f"{file.path} arrived corrupt (hash {digest}, the hub says {file.etag}); it was deleted: "
                      "run the same command again to fetch it anew")


def run_all(tasks: list, work, workers: int, meter: Meter):
    """work(task) for every task on `workers` threads. The first failure stops the others at their next write and is
    raised at once, as Ctrl-C is: a thread still waiting on the network is not waited for (the threads are daemons,
    and what they leave on disk is always a prefix of the file to resume from)."""
    if not tasks:
        return
    queue, lock, failures = list(reversed(tasks)), threading.Lock(), []
    threads = running = min(max(1, workers), len(tasks))  # running: threads not yet returned
    settled = threading.Event()  # every thread has returned, or one failed

    def worker():
        nonlocal running
        try:
            while not meter.stop.is_set():
                with lock:
                    if not queue:
                        return
                    task = queue.pop()
                try:
                    work(task)
                except BaseException as e:  # handed to the main thread, which raises it
                    failures.append(e)
                    meter.stop.set()
                    settled.set()
        finally:
            with lock:
                running -= 1
                if not running:
                    settled.set()

    for _ in range(threads):
        threading.Thread(target=worker, daemon=True).start()
    try:
        settled.wait()
    except BaseException:
        meter.stop.set()
        raise
    if failures:
        raise next((e for e in failures if not isinstance(e, Stopped)), failures[0])
