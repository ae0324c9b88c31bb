"""The hub, through huggingface_hub's own client: the revision's commit (HfApi.model_info), the file listing with LFS
sha256 (HfApi.list_repo_tree), each file's metadata (get_hf_file_metadata: HEAD on resolve) and bytes (http_get: GET
with Range, retried and resumed by the library on dropped connections and timeouts).

Every hub or network failure leaves here as one K2Error line that says what to do.
"""
import hashlib
import io
import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx2
from huggingface_hub import HfApi, constants, get_hf_file_metadata, hf_hub_url
from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, RemoteEntryNotFoundError, RepositoryNotFoundError,
                                    RevisionNotFoundError)
from huggingface_hub.file_download import http_get, repo_folder_name
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import build_hf_headers

from runtime.errors import K2Error
from runtime.resolve import k2_cache_dir

LOGIN_HINT = "log in with `hf auth login` or set HF_TOKEN"


class ConnectionLost(K2Error):
    """The network failed: what is on disk stays, and fetching again resumes from it."""


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    blob_id: str  # git sha1 of the content (for LFS files, of the pointer git stores)
    sha256: str | None = None  # LFS oid: the sha256 of the content

    @property
    def etag(self) -> str:
        """What the hub sends as the file's ETag, and what checks its bytes: sha256 for LFS files, git sha1 else."""
        return self.sha256 or self.blob_id

    def new_hash(self):
        """A hasher whose hexdigest() over the file's bytes is its etag."""
        return hashlib.sha256() if self.sha256 else hashlib.sha1(b"blob %d\0" % self.size)


@dataclass
class Listing:
    repo_id: str
    revision: str
    commit: str
    files: dict[str, RemoteFile]


class _Silent:
    """The per-file progress bar http_get asks for: k2 draws one bar over all files instead."""

    def __init__(self, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def update(self, n=1):
        pass

    def close(self):
        pass


class Hub:
    def __init__(self, repo_id: str, endpoint: str | None = None):
        self.repo_id = repo_id
        self.endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
        self.api = HfApi(endpoint=self.endpoint, library_name="k2")  # token: HF_TOKEN or the saved login

    @contextmanager
    def errors(self, revision: str, path: str | None = None):
        """Turn the client's exceptions into one line each."""
        where = f"{self.repo_id}" + (f" ({path})" if path else "")
        try:
            yield
        except GatedRepoError:
            raise K2Error(f"{self.repo_id} is gated: accept its conditions at {self.endpoint}/{self.repo_id}, then "
                          f"{LOGIN_HINT}") from None
        except RevisionNotFoundError:
            raise K2Error(f"revision {revision!r} not found in {self.repo_id} on {self.endpoint}") from None
        except RemoteEntryNotFoundError:
            raise K2Error(f"{path} not found in {self.repo_id} at revision {revision!r}") from None
        except RepositoryNotFoundError:
            raise K2Error(f"{self.repo_id} not found on {self.endpoint} (if it is private or gated, "
                          f"{LOGIN_HINT})") from None
        except HfHubHTTPError as e:
            status = e.response.status_code
            message = e.response.headers.get("X-Error-Message") or e.response.reason_phrase
            if status in (401, 403):
                raise K2Error(f"{self.endpoint} refused access to {where} ({status} {message}): {LOGIN_HINT} with a "
                              "token that can read it") from None
            raise K2Error(f"{self.endpoint} answered {status} {message} for {where}") from None
        except httpx2.ConnectError as e:
            raise ConnectionLost(f"cannot connect to {self.endpoint}: {_reason(e)} (check the network, or --endpoint / "
                                 "HF_ENDPOINT)") from None
        except httpx2.TimeoutException:
            raise ConnectionLost(f"{self.endpoint} stopped answering for {where}; run the same command again to "
                                 "resume") from None
        except httpx2.TransportError as e:  # dropped or reset, beyond the library's own retries
            raise ConnectionLost(f"connection to {self.endpoint} lost for {where}: {_reason(e)}; run the same command "
                                 "again to resume") from None

    def listing(self, revision: str) -> Listing:
        with self.errors(revision):
            commit = self.api.model_info(self.repo_id, revision=revision).sha
            files = {f.path: RemoteFile(f.path, f.size, f.blob_id, f.lfs.sha256 if f.lfs else None)
                     for f in self.api.list_repo_tree(self.repo_id, revision=commit, recursive=True)
                     if isinstance(f, RepoFile)}
        return Listing(self.repo_id, revision, commit, files)

    def location(self, listing: Listing, file: RemoteFile) -> str:
        """HEAD on the file at the listed commit: where its bytes are served (a CDN for LFS files), after checking
        the hub describes the same bytes as the listing did."""
        url = hf_hub_url(self.repo_id, file.path, revision=listing.commit, endpoint=self.endpoint)
        with self.errors(listing.revision, file.path):
            meta = get_hf_file_metadata(url, endpoint=self.endpoint, retry_on_errors=True)
        if meta.etag != file.etag or (meta.size is not None and meta.size != file.size):
            raise K2Error(f"{self.endpoint} describes {file.path} as {meta.size} bytes with etag {meta.etag}, but its "
                          f"listing says {file.size} bytes with {file.etag}")
        return meta.location

    def fetch(self, listing: Listing, file: RemoteFile, location: str, out, resume_size: int):
        """Append the file's bytes from `resume_size` on to `out`; the library retries and resumes dropped
        connections and timeouts a few times by itself before giving up."""
        headers = build_hf_headers(library_name="k2")
        if _origin(location) != _origin(self.endpoint):
            headers.pop("authorization", None)  # a CDN's signed URL: the token stays with the hub
        with self.errors(listing.revision, file.path):
            http_get(location, out, resume_size=resume_size, headers=headers, expected_size=file.size,
                     displayed_filename=file.path, tqdm_class=_Silent)

    def read(self, listing: Listing, file: RemoteFile) -> bytes:
        """A small file's bytes, in memory and verified."""
        buffer = io.BytesIO()
        self.fetch(listing, file, self.location(listing, file), buffer, resume_size=0)
        hasher = file.new_hash()
        hasher.update(buffer.getvalue())
        if hasher.hexdigest() != file.etag:
            raise K2Error(f"{file.path} arrived corrupt from {self.endpoint}; run the same command again")
        return buffer.getvalue()


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc.lower()


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[-1] if text else type(e).__name__


# --- listings saved for offline mode -----------------------------------------------------------------------------

def _saved_path(repo_id: str) -> Path:
    return k2_cache_dir() / "hub" / f"{repo_folder_name(repo_id=repo_id, repo_type='model')}.json"


def _read_saved(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):  # none yet, or cut short: the next online run writes it anew
        return {"revisions": {}, "commits": {}}


def save_listing(listing: Listing):
    """Keep the listing in k2's cache, so HF_HUB_OFFLINE=1 can still tell which files a download lacks."""
    path = _saved_path(listing.repo_id)
    saved = _read_saved(path)
    saved["revisions"][listing.revision] = listing.commit
    saved["commits"][listing.commit] = [asdict(f) for f in listing.files.values()]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(saved))
    os.replace(tmp, path)


def saved_listing(repo_id: str, revision: str) -> Listing:
    saved = _read_saved(_saved_path(repo_id))
    commit = saved["revisions"].get(revision, revision)
    if commit not in saved["commits"]:
        raise K2Error(f"HF_HUB_OFFLINE=1 and no earlier `k2 download {repo_id}` listed revision {revision!r}, so the "
                      "files it needs are unknown: unset HF_HUB_OFFLINE to download")
    files = {f["path"]: RemoteFile(**f) for f in saved["commits"][commit]}
    return Listing(repo_id, revision, commit, files)
