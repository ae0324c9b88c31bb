"""A fake Hugging Face hub on 127.0.0.1: the part of the hub's HTTP API that huggingface_hub's download path uses.

Endpoints, as huggingface_hub 2.x calls them:
  GET       /api/models/{repo}[/revision/{rev}]            repo info; `sha` is the commit the revision points to
  GET       /api/models/{repo}/tree/{rev}?recursive=true   file listing, paginated with a Link header; LFS files carry
                                                           lfs.oid (their sha256), other files oid (git blob sha1)
  HEAD|GET  /{repo}/resolve/{rev}/{path}                   regular files: 200 with ETag (git sha1) and X-Repo-Commit;
                                                           LFS files: 302 to the CDN with X-Linked-Etag (sha256),
                                                           X-Linked-Size and X-Repo-Commit, as the real hub answers
  HEAD|GET  http://localhost:PORT/cdn/{sha256}             the LFS bytes, with Range (206 and Content-Range)
Errors: 404 with X-Error-Code RepoNotFound, RevisionNotFound or EntryNotFound; 401 GatedRepo on a gated repo's
files without a valid token; 401 "Invalid credentials in Authorization header" for an unknown token.

The CDN is the same server under another host name, so to the client it is another origin (it must not receive the
token). Nothing advertises Xet (no X-Xet-Hash header, no xet-auth link, no xetHash in listings): huggingface_hub
then never routes a file to hf_xet.

For the tests it counts the body bytes it sends per file, logs every request, and can drop a connection or hold a
transfer after a given number of bytes of a file.
"""
import hashlib
import json
import socket
import struct
import threading
from dataclasses import dataclass, field
from functools import cached_property
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".model", ".bin", ".png")  # what a hub repo's default .gitattributes sends to LFS
SEND_BLOCK = 64 << 10


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class HubFile:
    path: str
    data: bytes
    lfs: bool

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @cached_property
    def lfs_pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @cached_property
    def oid(self) -> str:
        """The git blob id the tree lists: of the content, or of the LFS pointer that git stores instead."""
        return git_blob_id(self.lfs_pointer if self.lfs else self.data)

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.oid

    def tree_entry(self) -> dict:
        entry = {"type": "file", "oid": self.oid, "size": len(self.data), "path": self.path}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": len(self.data), "pointerSize": len(self.lfs_pointer)}
        return entry


@dataclass
class HubRepo:
    repo_id: str
    files: dict[str, HubFile]
    gated: bool = False
    refs: dict[str, str] = field(default_factory=dict)

    @property
    def commit(self) -> str:
        return hashlib.sha1("".join(f"{p}:{f.oid}" for p, f in sorted(self.files.items())).encode()).hexdigest()

    def resolve(self, revision: str) -> str | None:
        if revision == self.commit:
            return revision
        return self.refs.get(revision)


@dataclass
class Fault:
    """What happens to the next `times` GETs of one file once they reach byte `after_bytes` of it: the connection
    is dropped (with a FIN, or a RST when `reset`), after holding the transfer until `release` is set if given."""
    after_bytes: int
    times: int = 1
    reset: bool = False
    release: threading.Event | None = None
    reached: threading.Event = field(default_factory=threading.Event)


class FakeHub:
    def __init__(self, valid_tokens: tuple[str, ...] = ("hf_valid_token",), tree_page_size: int = 1000):
        self.repos: dict[str, HubRepo] = {}
        self.valid_tokens = set(valid_tokens)
        self.tree_page_size = tree_page_size
        self.faults: dict[str, Fault] = {}  # by file path
        self.honour_range = True  # False: answer Range requests with the whole file, as some CDNs and proxies do
        self.sent: dict[str, int] = {}  # body bytes of each file sent, all requests together
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.hub = self
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.cdn = f"http://localhost:{self.port}/cdn"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def add_repo(self, repo_id: str, folder: Path, gated: bool = False, extra: dict[str, bytes] | None = None) -> HubRepo:
        """Serve every file of `folder` (and `extra` files by path) as `repo_id` at branch main."""
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        files.update(extra or {})
        repo = HubRepo(repo_id, {path: HubFile(path, data, path.endswith(LFS_SUFFIXES)) for path, data in files.items()},
                       gated)
        repo.refs["main"] = repo.commit
        self.repos[repo_id] = repo
        return repo

    def reset_counts(self):
        with self.lock:
            self.sent.clear()
            self.requests.clear()

    def data_requests(self, path: str) -> list[dict]:
        """The GETs that fetched bytes of `path` (from the CDN or resolve), in order."""
        return [r for r in self.requests if r["file"] == path and r["method"] == "GET"]

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        for fault in self.faults.values():
            if fault.release:
                fault.release.set()
        self._server.shutdown()
        self._server.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects

    def log_message(self, *args):
        pass

    @property
    def hub(self) -> FakeHub:
        return self.server.hub

    def do_HEAD(self):
        self._route(body=False)

    def do_GET(self):
        self._route(body=True)

    # --- routing ----------------------------------------------------------------------------------------------

    def _route(self, body: bool):
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        token = self.headers.get("authorization", "").removeprefix("Bearer ").strip() or None
        entry = {"method": self.command, "path": url.path, "file": None, "range": self.headers.get("range"),
                 "auth": token is not None, "host": self.headers.get("host", "")}
        with self.hub.lock:
            self.hub.requests.append(entry)
        if token is not None and token not in self.hub.valid_tokens:
            return self._error(401, None, "Invalid credentials in Authorization header")
        if parts[0] == "cdn":
            return self._cdn(parts[1], entry, body)
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            return self._api(parts[2:], parse_qs(url.query), token)
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), token, entry, body)
        self._error(404, None, "Not found")

    def _repo(self, repo_id: str, revision: str | None) -> tuple[HubRepo | None, str | None]:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None, None
        commit = repo.resolve(revision or "main")
        if commit is None:
            self._error(404, "RevisionNotFound", "Invalid rev id: " + str(revision))
            return None, None
        return repo, commit

    def _api(self, parts: list[str], query: dict, token: str | None):
        repo_id, rest = f"{parts[0]}/{parts[1]}", parts[2:]
        if not rest or rest[0] == "revision":
            repo, commit = self._repo(repo_id, rest[1] if len(rest) > 1 else None)
            if repo:
                self._json({"id": repo_id, "modelId": repo_id, "sha": commit, "private": False,
                            "gated": "manual" if repo.gated else False, "disabled": False,
                            "siblings": [{"rfilename": p} for p in sorted(repo.files)]})
            return
        if rest[0] == "tree" and len(rest) >= 2:
            repo, commit = self._repo(repo_id, rest[1])
            if repo is None:
                return
            prefix = "/".join(rest[2:])
            entries = [f.tree_entry() for p, f in sorted(repo.files.items()) if p.startswith(prefix)]
            if query.get("recursive", ["false"])[0].lower() != "true":
                entries = [e for e in entries if "/" not in e["path"][len(prefix):].strip("/")]
            start = int(query.get("cursor", ["0"])[0])
            page = entries[start:start + self.hub.tree_page_size]
            headers = {}
            if start + self.hub.tree_page_size < len(entries):
                next_url = (f"{self.hub.endpoint}/api/models/{repo_id}/tree/{quote(rest[1], safe='')}"
                            f"?recursive=true&expand=false&cursor={start + self.hub.tree_page_size}")
                headers["Link"] = f'<{next_url}>; rel="next"'
            return self._json(page, headers)
        self._error(404, None, "Not found")

    def _resolve(self, repo_id: str, revision: str, path: str, token: str | None, entry: dict, body: bool):
        repo, commit = self._repo(repo_id, revision)
        if repo is None:
            return
        if repo.gated and token is None:
            return self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access to it "
                                                 "and be authenticated to access it. Please log in.")
        file = repo.files.get(path)
        if file is None:
            return self._error(404, "EntryNotFound", f"{path} does not exist", {"X-Repo-Commit": commit})
        entry["file"] = path
        headers = {"X-Repo-Commit": commit}
        if file.lfs:
            headers.update({"Location": f"{self.hub.cdn}/{file.sha256}", "X-Linked-Etag": f'"{file.sha256}"',
                            "X-Linked-Size": str(len(file.data)), "ETag": f'"{file.oid}"', "Content-Length": "0"})
            self.send_response(302)
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            return
        headers["ETag"] = f'"{file.oid}"'
        self._send_file(file, headers, body)

    def _cdn(self, sha256: str, entry: dict, body: bool):
        for repo in self.hub.repos.values():
            for file in repo.files.values():
                if file.lfs and file.sha256 == sha256:
                    entry["file"] = file.path
                    return self._send_file(file, {"ETag": f'"{sha256}"'}, body)
        self._error(404, None, "No such object")

    # --- responses --------------------------------------------------------------------------------------------

    def _send_file(self, file: HubFile, headers: dict, body: bool):
        total = len(file.data)
        start, status = 0, 200
        requested = self.headers.get("range") if self.hub.honour_range else None
        if requested:
            first, _, last = requested.removeprefix("bytes=").partition("-")
            start, end = int(first), int(last) if last else total - 1
            if start >= total:
                return self._error(416, None, "Range not satisfiable", {"Content-Range": f"bytes */{total}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{total}"
        else:
            end = total - 1
        self.send_response(status)
        for key, value in (headers | {"Content-Length": str(end + 1 - start), "Accept-Ranges": "bytes"}).items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self._stream(file, start, end + 1)

    def _stream(self, file: HubFile, start: int, stop: int):
        fault = self.hub.faults.get(file.path)
        try:
            for offset in range(start, stop, SEND_BLOCK):
                block = file.data[offset:min(offset + SEND_BLOCK, stop)]
                if fault and fault.times > 0 and offset + len(block) > fault.after_bytes:
                    self._send(file.path, block[:max(fault.after_bytes - offset, 0)])
                    return self._interrupt(fault)
                self._send(file.path, block)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _send(self, path: str, block: bytes):
        with self.hub.lock:  # counted before it leaves: once the client has a byte, the count has it too
            self.hub.sent[path] = self.hub.sent.get(path, 0) + len(block)
        self.wfile.write(block)
        self.wfile.flush()

    def _interrupt(self, fault: Fault):
        fault.reached.set()
        if fault.release is not None:
            fault.release.wait(timeout=60)
        fault.times -= 1
        self.close_connection = True
        if fault.reset:  # SO_LINGER 0, then close before the server's own shutdown: a RST, no FIN
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.rfile.close()
            self.connection.close()
        else:
            self.connection.shutdown(socket.SHUT_RDWR)

    def _json(self, data, headers: dict | None = None):
        payload = json.dumps(data).encode()
        self.send_response(200)
        for key, value in ({"Content-Type": "application/json", "Content-Length": str(len(payload))}
                           | (headers or {})).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(payload)

    def _error(self, status: int, code: str | None, message: str, headers: dict | None = None):
        payload = json.dumps({"error": message}).encode()
        self.send_response(status)
        extra = {"X-Error-Message": message} | ({"X-Error-Code": code} if code else {}) | (headers or {})
        for key, value in ({"Content-Type": "application/json", "Content-Length": str(len(payload))} | extra).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
