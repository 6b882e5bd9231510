"""An in-process fake of the Hugging Face Hub, so upload/download code is tested over real HTTP.

It speaks just enough of the Hub protocol for an unmodified `huggingface_hub` (checked with 2.4.0)
pointed at it via `endpoint=` or `HF_ENDPOINT`: create_repo, delete_repo, upload_folder and
create_commit, model_info/repo_info, list_repo_files/list_repo_tree, hf_hub_download and
snapshot_download, on model repos. Like the real Hub, preupload sends binary and large files
(weights, plots, anything with a NUL byte or over 10 MB) down the Git LFS route: the LFS batch API
hands out a signed PUT URL on a separate storage origin (an S3 stand-in on its own port, so the
client must not send the token there) and a verify URL, and the commit then names the object by
sha256 in an `lfsFile` line; downloads of such files redirect to the storage origin. Other files
travel base64-encoded inside the NDJSON commit.

No Xet: the fake advertises no Xet transfer, answers no xet token route and sends no X-Xet-*
headers. huggingface_hub 2.4.0 does not ask the server, though: with hf_xet importable it uploads
every LFS-mode file through Xet (`_commit_api._upload_files`), so clients of this fake must set
HF_HUB_DISABLE_XET=1, which takes the LFS route that a client without hf_xet takes.

Repos live in memory, and a commit is applied only once its whole body has been read and parsed
and every LFS object it names is in storage.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import socket
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

_API = re.compile(r"/api/models/([^/]+/[^/]+)(?:/(revision|tree|preupload|commit)/([^/]+)(/.*)?)?")
_RESOLVE = re.compile(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)")
_LFS = re.compile(r"/([^/]+/[^/]+)\.git/info/lfs/objects/(batch|verify)")
_STORAGE = re.compile(r"/lfs-storage/([^/]+/[^/]+)/([0-9a-f]{64})")
_WRITES = {"create", "delete", "preupload", "commit", "lfs-batch", "lfs-verify"}
LFS_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".png")
"""Besides these, any file with a NUL byte in its first 512 bytes or over 10 MB goes to LFS."""
REGULAR_MAX = 10 * 1024 * 1024


def git_blob_sha(data: bytes) -> str:
    """The git blob id, which the Hub reports as a regular file's oid and ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def sha256(data: bytes) -> str:
    """An LFS object's oid."""
    return hashlib.sha256(data).hexdigest()


def needs_lfs(path: str, size: int, sample: bytes) -> bool:
    """The Hub's rule, roughly: weights by name, and anything binary or large, go to LFS."""
    return path.endswith(LFS_SUFFIXES) or size > REGULAR_MAX or b"\0" in sample[:512]


def lfs_pointer(data: bytes) -> bytes:
    """The git LFS pointer file that git stores in place of an LFS file."""
    spec = "version https://git-lfs.github.com/spec/v1"
    return f"{spec}\noid sha256:{sha256(data)}\nsize {len(data)}\n".encode()


def file_entry(path: str, data: bytes) -> dict[str, Any]:
    """A file's oid and size as the tree API lists it, with the `lfs` block for LFS files."""
    if not needs_lfs(path, len(data), data):
        return {"oid": git_blob_sha(data), "size": len(data)}
    pointer = lfs_pointer(data)
    lfs = {"oid": sha256(data), "size": len(data), "pointerSize": len(pointer)}
    return {"oid": git_blob_sha(pointer), "size": len(data), "lfs": lfs}


class FakeHub:
    """The fake Hub's state. Tests read it, seed it with `commit`, and set the failure knobs."""

    def __init__(self, token: str, user: str = "user") -> None:
        self.token, self.user, self.url, self.storage_url = token, user, "", ""
        self.repos: dict[str, dict[str, bytes]] = {}  # repo_id -> files at the head of main
        self.shas: dict[str, str] = {}  # repo_id -> head commit sha
        self.history: dict[tuple[str, str], dict[str, bytes]] = {}  # older commits, by sha
        self.lfs: dict[tuple[str, str], bytes] = {}  # (repo_id, sha256) -> stored LFS object
        self.secret = secrets.token_hex(8)  # signs storage URLs, as S3 presigned URLs are
        # Failure knobs, by endpoint name ("commit", "lfs-upload", "lfs-batch", "lfs-verify", ...).
        # fail_next answers fail_status after reading the body, with Retry-After: 0 so that the
        # client's retries (up to 5 on 408/429/5xx, for the LFS routes) sleep 1 s each; to make
        # such a request fail for good, set >= 6, or a status it does not retry, such as 403.
        # drop_next reads half the body and hangs up without an answer, like a dying proxy; the
        # client retries that with backoff (1+2+4+8+8 s).
        self.fail_next: Counter[str] = Counter()
        self.fail_status = 500
        self.drop_next: Counter[str] = Counter()
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request
        self.calls: Counter[str] = Counter()  # endpoint name ("commit", "resolve", ...) -> count
        self.lock = threading.Lock()
        self.open: set[socket.socket] = set()  # kept-alive connections, cut when the hub stops

    def commit(self, repo_id: str, files: dict[str, bytes], deleted: Iterable[str] = ()) -> str:
        """Atomically publish a new head of `repo_id` (creating it), and return its sha. Files
        that need LFS are put in storage too, so a test can seed a repo directly."""
        with self.lock:
            old = self.repos.get(repo_id, {})
            new = {**old, **files}
            for gone in deleted:  # a file or a whole folder
                new = {p: b for p, b in new.items() if p != gone and not p.startswith(gone + "/")}
            for path, data in files.items():
                if needs_lfs(path, len(data), data):
                    self.lfs[repo_id, sha256(data)] = data
            parent = self.shas.get(repo_id, "")
            if parent:
                self.history[repo_id, parent] = old
            listing = "".join(f"{p}\0{git_blob_sha(b)}\n" for p, b in sorted(new.items()))
            sha = hashlib.sha1(f"{repo_id}\n{parent}\n{listing}".encode()).hexdigest()
            self.repos[repo_id], self.shas[repo_id] = new, sha
            return sha

    def delete(self, repo_id: str) -> None:
        """Remove a repo with its history and its LFS objects, as the Hub's delete does."""
        with self.lock:
            del self.repos[repo_id]
            self.shas.pop(repo_id, None)
            for key in [k for k in (*self.history, *self.lfs) if k[0] == repo_id]:
                self.history.pop(key, None)
                self.lfs.pop(key, None)

    def take(self, knob: Counter[str], name: str) -> bool:
        """Use up one unit of a failure knob (`fail_next` or `drop_next`) for `name`, if any."""
        with self.lock:
            left = knob[name]
            knob[name] = max(0, left - 1)
            return left > 0

    def snapshot(self, repo_id: str, revision: str) -> tuple[str, dict[str, bytes]] | None:
        """The (sha, files) that a branch name or commit sha points to, or None if unknown."""
        head = self.shas.setdefault(repo_id, git_blob_sha(repo_id.encode()))
        if revision in ("main", head):
            return head, self.repos[repo_id]
        files = self.history.get((repo_id, revision))
        return None if files is None else (revision, files)

    def signature(self, path: str) -> str:
        """The signature that makes a storage URL valid (it stands in for S3's presigning)."""
        return hashlib.sha256(f"{self.secret}:{path}".encode()).hexdigest()

    def storage_href(self, repo_id: str, oid: str) -> str:
        """A signed URL of one LFS object on the storage origin, as the Hub hands out."""
        path = f"/lfs-storage/{repo_id}/{oid}"
        return f"{self.storage_url}{path}?X-Amz-Signature={self.signature(path)}"


class _Handler(BaseHTTPRequestHandler):
    """Routes one request; HTTP/1.1 keep-alive because httpx pools its connections."""

    protocol_version = "HTTP/1.1"
    hub: FakeHub  # set on the per-server subclass made by serve_hub

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: test output should not fill up with access logs."""

    def setup(self) -> None:
        super().setup()
        self.hub.open.add(self.connection)

    def finish(self) -> None:
        self.hub.open.discard(self.connection)
        super().finish()

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        api, resolve = _API.fullmatch(url.path), _RESOLVE.fullmatch(url.path)
        lfs, storage = _LFS.fullmatch(url.path), _STORAGE.fullmatch(url.path)
        if url.path in ("/api/repos/create", "/api/repos/delete", "/api/validate-yaml"):
            name = url.path.rsplit("/", 1)[1]
        elif api:
            name = "info" if api[2] in (None, "revision") else api[2]
        elif lfs:
            name = f"lfs-{lfs[2]}"
        elif storage:
            name = "lfs-upload" if self.command == "PUT" else "lfs-download"
        else:
            name = "resolve" if resolve else "other"
        with self.hub.lock:
            self.hub.requests.append((self.command, url.path))
            self.hub.calls[name] += 1
        size = int(self.headers.get("Content-Length") or 0)
        if self.hub.take(self.hub.drop_next, name):
            self.rfile.read(size // 2)  # then hang up without an answer, like a dying proxy
            self.close_connection = True
            return
        body = self.rfile.read(size)  # always drain, so a kept-alive connection stays in sync
        if storage:
            return self._storage(storage[1], storage[2], url.path, parse_qs(url.query), body)
        auth = self.headers.get("Authorization")
        if auth is not None and auth != f"Bearer {self.hub.token}":
            return self._error(401, "Invalid credentials in Authorization header")
        if name in _WRITES and auth is None:
            return self._error(401, "Invalid username or password.")
        if self.hub.take(self.hub.fail_next, name):
            return self._injected(name)
        if name == "create":
            return self._create(json.loads(body))
        if name == "validate-yaml":
            return self._json({"errors": [], "warnings": []})
        if name == "delete":
            return self._delete(json.loads(body))
        repo = api or resolve or lfs
        if repo and repo[1] not in self.hub.repos:
            return self._error(404, "Repository not found", "RepoNotFound")
        if lfs:
            return self._lfs(lfs[1], lfs[2], json.loads(body))
        if api:
            repo_id, revision, rest = api[1], unquote(api[3] or "main"), unquote(api[4] or "")
            if name in _WRITES and revision != "main":
                return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            snap = self.hub.snapshot(repo_id, revision)
            if snap is None:
                return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            if name == "info":
                return self._info(repo_id, *snap)
            if name == "tree":
                recursive = parse_qs(url.query).get("recursive", ["false"])[0].lower() == "true"
                return self._tree(snap[1], rest.strip("/"), recursive)
            if name == "preupload":
                return self._preupload(snap[1], json.loads(body))
            return self._commit(repo_id, body)
        if resolve:
            return self._resolve(resolve[1], unquote(resolve[2]), unquote(resolve[3]))
        return self._error(404, "Not Found")

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def _injected(self, name: str) -> None:
        """A failure set by a test; Retry-After: 0 keeps the client's retries short."""
        message = f"Injected {name} failure (fake hub)"
        self._error(self.hub.fail_status, message, extra={"Retry-After": "0"})

    def _create(self, payload: dict[str, Any]) -> None:
        repo_id = f"{payload.get('organization') or self.hub.user}/{payload['name']}"
        if payload.get("type", "model") != "model":
            return self._error(400, "This fake hub only serves model repos")
        url = f"{self.hub.url}/{repo_id}"
        if repo_id in self.hub.repos:  # create_repo(exist_ok=True) reads "url" from this answer
            return self._json({"error": "You already created this model repo", "url": url}, 409)
        self.hub.commit(repo_id, {})
        self._json({"url": url, "name": repo_id, "id": repo_id})

    def _delete(self, payload: dict[str, Any]) -> None:
        repo_id = f"{payload.get('organization') or self.hub.user}/{payload['name']}"
        if repo_id not in self.hub.repos:
            return self._error(404, "Repository not found", "RepoNotFound")
        self.hub.delete(repo_id)
        self._send(200, b"", "text/plain", {})

    def _info(self, repo_id: str, sha: str, files: dict[str, bytes]) -> None:
        siblings = []
        for path, data in files.items():
            entry = file_entry(path, data)
            siblings.append({"rfilename": path, "size": entry["size"], "blobId": entry["oid"]})
        info = {"_id": repo_id, "id": repo_id, "modelId": repo_id, "sha": sha, "private": False}
        self._json({**info, "tags": [], "downloads": 0, "likes": 0, "siblings": siblings})

    def _tree(self, files: dict[str, bytes], folder: str, recursive: bool) -> None:
        base = f"{folder}/" if folder else ""
        entries: dict[str, dict[str, Any]] = {}
        for path, data in sorted(files.items()):
            if not path.startswith(base):
                continue
            parts = path[len(base) :].split("/")
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                sub = base + "/".join(parts[:depth])
                entries[sub] = {"type": "directory", "oid": git_blob_sha(sub.encode()), "size": 0}
            if recursive or len(parts) == 1:
                entries[path] = {"type": "file", **file_entry(path, data)}
        if folder and not entries:
            return self._error(404, f"{folder} does not exist on main", "EntryNotFound")
        self._json([{**entry, "path": path} for path, entry in entries.items()])

    def _preupload(self, files: dict[str, bytes], payload: dict[str, Any]) -> None:
        """LFS for binary or large files, inline for the rest; the oid of a file already there
        (sha256 for LFS, git sha1 otherwise) lets the client skip it."""
        answers = []
        for item in payload["files"]:
            path, sample = item["path"], base64.b64decode(item["sample"])
            lfs = needs_lfs(path, item["size"], sample)
            oid = None
            if path in files:
                oid = sha256(files[path]) if lfs else git_blob_sha(files[path])
            mode = "lfs" if lfs else "regular"
            answers.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._json({"files": answers})

    def _lfs(self, repo_id: str, route: str, payload: dict[str, Any]) -> None:
        """The LFS batch API (upload instructions: a signed storage PUT, then verify) and the
        verify call. Only the "basic" transfer is offered, never "xet" or "multipart"."""
        if route == "verify":
            stored = self.hub.lfs.get((repo_id, payload["oid"]))
            if stored is None or len(stored) != payload["size"]:
                return self._error(404, f"Object {payload['oid']} not found in storage")
            return self._json({"success": True})
        if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", []):
            return self._error(422, "This fake hub only takes basic LFS uploads")
        verify = f"{self.hub.url}/{repo_id}.git/info/lfs/objects/verify"
        objects = []
        for item in payload["objects"]:
            obj = {"oid": item["oid"], "size": item["size"], "authenticated": True}
            if (repo_id, item["oid"]) not in self.hub.lfs:  # no "actions": already uploaded
                upload = {"href": self.hub.storage_href(repo_id, item["oid"])}
                obj["actions"] = {"upload": upload, "verify": {"href": verify}}
            objects.append(obj)
        self._send(
            200,
            json.dumps({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}).encode(),
            "application/vnd.git-lfs+json",
            {},
        )

    def _storage(self, repo_id: str, oid: str, path: str, query: dict, body: bytes) -> None:
        """The S3 stand-in: signed URLs only, no Hub token, and an object is stored only once it
        has arrived whole with the right sha256."""
        if query.get("X-Amz-Signature") != [self.hub.signature(path)]:
            return self._error(403, "SignatureDoesNotMatch")
        if "Authorization" in self.headers:  # S3 refuses a second auth mechanism; no token leaks
            return self._error(400, "Only one auth mechanism allowed")
        name = "lfs-upload" if self.command == "PUT" else "lfs-download"
        if self.hub.take(self.hub.fail_next, name):
            return self._injected(name)
        if self.command == "PUT":
            if sha256(body) != oid:
                return self._error(400, "BadDigest: the body's sha256 is not the object's oid")
            with self.hub.lock:
                self.hub.lfs[repo_id, oid] = body
            return self._send(200, b"", "text/plain", {"ETag": f'"{oid}"'})
        data = self.hub.lfs.get((repo_id, oid))
        if data is None:
            return self._error(404, "NoSuchKey")
        self._send(200, data, "application/octet-stream", {"ETag": f'"{oid}"'})

    def _commit(self, repo_id: str, body: bytes) -> None:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next((x["value"] for x in lines if x["key"] == "header"), {})
        added, deleted = {}, []
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file" and value.get("encoding") == "base64":
                data = base64.b64decode(value["content"])
                if needs_lfs(value["path"], len(data), data):
                    return self._error(422, f"{value['path']} is binary or large: use LFS")
                added[value["path"]] = data
            elif key == "lfsFile":
                data = self.hub.lfs.get((repo_id, value["oid"]))
                if value.get("algo") != "sha256" or data is None:
                    return self._error(422, f"LFS pointer {value['path']} names no stored object")
                added[value["path"]] = data
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"].rstrip("/"))
            elif key != "header":
                return self._error(422, f"Unsupported commit operation {key!r}")
        parent = header.get("parentCommit")
        if parent and parent != self.hub.shas[repo_id]:
            return self._error(412, "A commit has happened since. Please refresh and try again.")
        sha = self.hub.commit(repo_id, added, deleted)
        url = f"{self.hub.url}/{repo_id}/commit/{sha}"
        self._json({"success": True, "commitOid": sha, "commitUrl": url, "pullRequestUrl": None})

    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        """Regular files are served here; LFS files redirect to storage, with their sha256 and
        size in X-Linked-* headers, as the Hub redirects to its CDN."""
        snap = self.hub.snapshot(repo_id, revision)
        if snap is None:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        sha, files = snap
        if path not in files:
            return self._error(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": sha})
        entry = file_entry(path, files[path])
        if "lfs" not in entry:
            headers = {"ETag": f'"{entry["oid"]}"', "X-Repo-Commit": sha}
            return self._send(200, files[path], "application/octet-stream", headers)
        oid = entry["lfs"]["oid"]
        headers = {
            "Location": self.hub.storage_href(repo_id, oid),
            "ETag": f'"{oid}"',
            "X-Linked-Etag": f'"{oid}"',
            "X-Linked-Size": str(entry["size"]),
            "X-Repo-Commit": sha,
        }
        self._send(302, b"", "text/plain", headers)

    def _json(self, obj: Any, status: int = 200) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json", {})

    def _error(self, status: int, message: str, code: str = "", extra: dict | None = None) -> None:
        """Answer like the Hub: JSON body and X-Error-Code, which huggingface_hub maps to errors."""
        headers = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {})}
        body = json.dumps({"error": message}).encode()
        self._send(status, body, "application/json", {**headers, **(extra or {})})

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in {"Content-Type": content_type, **headers}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


@contextmanager
def serve_hub(token: str, user: str = "user") -> Iterator[FakeHub]:
    """Run a FakeHub on a free 127.0.0.1 port, and its LFS storage on another (a different
    origin, as S3 is), for the duration of the block."""
    hub = FakeHub(token, user)
    handler = type("Handler", (_Handler,), {"hub": hub})
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), handler) for _ in range(2)]
    hub.url, hub.storage_url = (f"http://127.0.0.1:{s.server_port}" for s in servers)
    threads = [
        threading.Thread(target=s.serve_forever, name="fake-hub", daemon=True) for s in servers
    ]
    for thread in threads:
        thread.start()
    try:
        yield hub
    finally:
        for server, thread in zip(servers, threads, strict=True):
            server.shutdown()
            server.server_close()
            thread.join()
        for conn in list(hub.open):  # else pooled client connections would still get answers
            with suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
