"""Where downloaded files go, in the layouts huggingface_hub writes itself, so its tools and `k2 MODEL` find them.

A file is fetched into a partial file that outlives an interrupted run (the next run resumes from its size) and is
moved into place only after its hash matched the hub's: a file in place is a whole, verified file.
"""
import os
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub._local_folder import get_local_download_paths, read_download_metadata, write_download_metadata
from huggingface_hub.file_download import repo_folder_name

from runtime.hub.remote import RemoteFile

DONE, CHECK, PARTIAL, MISSING = "done", "check", "partial", "missing"


@dataclass
class FileState:
    file: RemoteFile
    status: str  # DONE: in place and recorded by etag; CHECK: in place, unrecorded (hash it); PARTIAL; MISSING
    have: int  # bytes of it on disk

    @property
    def needed(self) -> int:
        return self.file.size - self.have


class CacheStore:
    """The Hugging Face cache: blobs/<etag>, snapshots/<commit>/<path> -> that blob, refs/<revision> -> commit.

    Partial files are blobs/<etag>.incomplete (the library's own temporary files carry a unique suffix instead).
    """

    def __init__(self, cache_dir: Path, repo_id: str, commit: str):
        self.cache_dir, self.commit = Path(cache_dir), commit
        self.root = self.cache_dir / repo_folder_name(repo_id=repo_id, repo_type="model")
        self.folder = self.root / "snapshots" / commit
        self.lock_path = self.cache_dir / ".locks" / self.root.name / "k2-download.lock"

    def final_path(self, file: RemoteFile) -> Path:
        return self.folder / file.path

    def content_path(self, file: RemoteFile) -> Path:
        """Where the bytes are: the blob (the snapshot entry may not point at it yet)."""
        return self.root / "blobs" / file.etag

    def partial_path(self, file: RemoteFile) -> Path:
        return self.content_path(file).with_name(file.etag + ".incomplete")

    def state(self, file: RemoteFile) -> FileState:
        """A blob is named by its etag, so one of the right size is this file (another revision may have fetched it)."""
        blob, partial = self.content_path(file), self.partial_path(file)
        if blob.is_file() and blob.stat().st_size == file.size:
            return FileState(file, DONE, file.size)
        if partial.is_file():
            return FileState(file, PARTIAL, partial.stat().st_size)
        return FileState(file, MISSING, 0)

    def place(self, file: RemoteFile, partial: Path):
        os.replace(partial, self.content_path(file))
        self.link(file)

    def link(self, file: RemoteFile):
        """The snapshot's entry: a relative symlink to the blob, as huggingface_hub makes it."""
        pointer = self.final_path(file)
        target = os.path.relpath(self.content_path(file), pointer.parent)
        if pointer.is_symlink() and os.readlink(pointer) == target:
            return
        pointer.parent.mkdir(parents=True, exist_ok=True)
        tmp = pointer.with_name(f".{pointer.name}.{os.getpid()}.link")
        os.symlink(target, tmp)
        os.replace(tmp, pointer)

    def discard(self, file: RemoteFile):
        self.content_path(file).unlink(missing_ok=True)

    def finish(self, revision: str):
        """Point the revision at the commit once its files are in place: until then `k2 MODEL` does not find it."""
        if revision == self.commit:
            return
        ref = self.root / "refs" / revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        tmp = ref.with_name(f".{ref.name}.{os.getpid()}")
        tmp.write_text(self.commit)
        os.replace(tmp, ref)


class LocalDirStore:
    """A plain folder (--local-dir), with huggingface_hub's records in .cache/huggingface/download/: per file the
    commit and etag it was fetched at, and the partial files."""

    def __init__(self, local_dir: Path, commit: str):
        self.folder, self.commit = Path(local_dir).expanduser().resolve(), commit
        self.lock_path = self.folder / ".cache" / "huggingface" / "k2-download.lock"

    def final_path(self, file: RemoteFile) -> Path:
        return self.folder / file.path

    content_path = final_path

    def partial_path(self, file: RemoteFile) -> Path:
        return get_local_download_paths(self.folder, file.path).incomplete_path(file.etag)

    def state(self, file: RemoteFile) -> FileState:
        """A file of the right size is done if the record says it was fetched with this etag; otherwise (no record,
        another etag, or modified since) its hash decides."""
        if not self.folder.is_dir():
            return FileState(file, MISSING, 0)
        final = self.final_path(file)
        if final.is_file() and final.stat().st_size == file.size:
            record = read_download_metadata(self.folder, file.path)
            return FileState(file, DONE if record and record.etag == file.etag else CHECK, file.size)
        partial = self.partial_path(file)
        if partial.is_file():
            return FileState(file, PARTIAL, partial.stat().st_size)
        return FileState(file, MISSING, 0)

    def place(self, file: RemoteFile, partial: Path):
        os.replace(partial, self.final_path(file))
        self.link(file)

    def link(self, file: RemoteFile):
        """Record the file as fetched at this commit (for a file whose hash was just checked, too)."""
        write_download_metadata(self.folder, file.path, self.commit, file.etag)

    def discard(self, file: RemoteFile):
        self.final_path(file).unlink(missing_ok=True)

    def finish(self, revision: str):
        pass
