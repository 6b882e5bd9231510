"""An in-process fake of the Hugging Face Hub, so upload/download code is tested over real HTTP.

It speaks just enough of the Hub protocol for an unmodified `huggingface_hub` (checked with 2.4.0)
pointed at it via `endpoint=` or `HF_ENDPOINT`: create_repo, upload_folder/create_commit,
model_info/repo_info, list_repo_files/list_repo_tree, hf_hub_download and snapshot_download, on
model repos. Preupload answers "regular" for every file, so contents travel base64-encoded inside
the NDJSON commit and no LFS or Xet transfer ever starts; downloads carry no Xet headers either.
Repos live in memory, and a commit is applied only once its whole body has been read and parsed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
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
_WRITES = {"create", "preupload", "commit"}


def git_blob_sha(data: bytes) -> str:
    """The git blob id, which the Hub reports as a regular file's oid and ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """The fake Hub's state. Tests read it, seed it with `commit`, and set the failure knobs."""

    def __init__(self, token: str, user: str = "user") -> None:
        self.token, self.user, self.url = token, user, ""
        self.repos: dict[str, dict[str, bytes]] = {}  # repo_id -> files at the head of main
        self.shas: dict[str, str] = {}  # repo_id -> head commit sha
        self.history: dict[tuple[str, str], dict[str, bytes]] = {}  # older commits, by sha
        # Failure knobs. With hf_xet installed, upload_folder retries a commit that got 408/429/5xx
        # or lost its connection up to 5 times (sleeping 1+2+4+8+8 s), so to make the client fail,
        # set fail_next_commits >= 6, or fail_status to a code it does not retry, such as 403.
        self.fail_next_commits = 0  # commits to refuse with fail_status after reading the body
        self.fail_status = 500
        self.drop_next_commits = 0  # commits whose connection is cut halfway through the body
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request
        self.calls: Counter[str] = Counter()  # endpoint name ("commit", "resolve", ...) -> count
        self.lock = threading.Lock()
        self.open: set[socket.socket] = set()  # kept-alive connections, cut when the hub stops

    def commit(self, repo_id: str, files: dict[str, bytes], deleted: Iterable[str] = ()) -> str:
        """Atomically publish a new head of `repo_id` (creating it), and return its sha."""
        with self.lock:
            old = self.repos.get(repo_id, {})
            new = {**old, **files}
            for gone in deleted:  # a file or a whole folder
                new = {p: b for p, b in new.items() if p != gone and not p.startswith(gone + "/")}
            parent = self.shas.get(repo_id, "")
            if parent:
                self.history[repo_id, parent] = old
            listing = "".join(f"{p}\0{git_blob_sha(b)}\n" for p, b in sorted(new.items()))
            sha = hashlib.sha1(f"{repo_id}\n{parent}\n{listing}".encode()).hexdigest()
            self.repos[repo_id], self.shas[repo_id] = new, sha
            return sha

    def take(self, knob: str) -> bool:
        """Use up one unit of a failure knob such as `fail_next_commits`, if any is left."""
        with self.lock:
            left = getattr(self, knob)
            setattr(self, knob, max(0, left - 1))
            return left > 0

    def snapshot(self, repo_id: str, revision: str) -> tuple[str, dict[str, bytes]] | None:
        """The (sha, files) that a branch name or commit sha points to, or None if unknown."""
        head = self.shas.setdefault(repo_id, git_blob_sha(repo_id.encode()))
        if revision in ("main", head):
            return head, self.repos[repo_id]
        files = self.history.get((repo_id, revision))
        return None if files is None else (revision, files)


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
        if url.path == "/api/repos/create" or url.path == "/api/validate-yaml":
            name = url.path.rsplit("/", 1)[1]
        elif api:
            name = "info" if api[2] in (None, "revision") else api[2]
        else:
            name = "resolve" if resolve else "other"
        with self.hub.lock:
            self.hub.requests.append((self.command, url.path))
            self.hub.calls[name] += 1
        size = int(self.headers.get("Content-Length") or 0)
        if name == "commit" and self.hub.take("drop_next_commits"):
            self.rfile.read(size // 2)  # then hang up without an answer, like a dying proxy
            self.close_connection = True
            return
        body = self.rfile.read(size)  # always drain, so a kept-alive connection stays in sync
        auth = self.headers.get("Authorization")
        if auth is not None and auth != f"Bearer {self.hub.token}":
            return self._error(401, "Invalid credentials in Authorization header")
        if name in _WRITES and auth is None:
            return self._error(401, "Invalid username or password.")
        if name == "create":
            return self._create(json.loads(body))
        if name == "validate-yaml":
            return self._json({"errors": [], "warnings": []})
        if (api or resolve) and (api or resolve)[1] not in self.hub.repos:
            return self._error(404, "Repository not found", "RepoNotFound")
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

    do_HEAD = do_POST = do_GET

    def _create(self, payload: dict[str, Any]) -> None:
        repo_id = f"{payload.get('organization') or self.hub.user}/{payload['name']}"
        if payload.get("type", "model") != "model":
            return self._error(400, "This fake hub only serves model repos")
        url = f"{self.hub.url}/{repo_id}"
        if repo_id in self.hub.repos:  # create_repo(exist_ok=True) reads "url" from this answer
            return self._json({"error": "You already created this model repo", "url": url}, 409)
        self.hub.commit(repo_id, {})
        self._json({"url": url, "name": repo_id, "id": repo_id})

    def _info(self, repo_id: str, sha: str, files: dict[str, bytes]) -> None:
        siblings = [
            {"rfilename": p, "size": len(b), "blobId": git_blob_sha(b)} for p, b in files.items()
        ]
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
                entries[path] = {"type": "file", "oid": git_blob_sha(data), "size": len(data)}
        if folder and not entries:
            return self._error(404, f"{folder} does not exist on main", "EntryNotFound")
        self._json([{**entry, "path": path} for path, entry in entries.items()])

    def _preupload(self, files: dict[str, bytes], payload: dict[str, Any]) -> None:
        """Every file goes inline; the oid of a file already there lets the client skip it."""
        paths = [item["path"] for item in payload["files"]]
        oids = [git_blob_sha(files[p]) if p in files else None for p in paths]
        answers = [{"path": p, "uploadMode": "regular", "shouldIgnore": False} for p in paths]
        self._json({"files": [{**a, "oid": oid} for a, oid in zip(answers, oids, strict=True)]})

    def _commit(self, repo_id: str, body: bytes) -> None:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next((x["value"] for x in lines if x["key"] == "header"), {})
        added, deleted = {}, []
        for line in lines:
            value = line["value"]
            if line["key"] == "file" and value.get("encoding") == "base64":
                added[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"].rstrip("/"))
            elif line["key"] != "header":
                return self._error(422, f"Unsupported commit operation {line['key']!r}")
        if self.hub.take("fail_next_commits"):
            return self._error(self.hub.fail_status, "Injected commit failure (fake hub)")
        parent = header.get("parentCommit")
        if parent and parent != self.hub.shas[repo_id]:
            return self._error(412, "A commit has happened since. Please refresh and try again.")
        sha = self.hub.commit(repo_id, added, deleted)
        url = f"{self.hub.url}/{repo_id}/commit/{sha}"
        self._json({"success": True, "commitOid": sha, "commitUrl": url, "pullRequestUrl": None})

    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        snap = self.hub.snapshot(repo_id, revision)
        if snap is None:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        sha, files = snap
        if path not in files:
            return self._error(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": sha})
        headers = {"ETag": f'"{git_blob_sha(files[path])}"', "X-Repo-Commit": sha}
        self._send(200, files[path], "application/octet-stream", headers)

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
    """Run a FakeHub on a free 127.0.0.1 port for the duration of the block."""
    hub = FakeHub(token, user)
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (_Handler,), {"hub": hub}))
    hub.url = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, name="fake-hub", daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
        for conn in list(hub.open):  # else pooled client connections would still get answers
            with suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
