"""Where a cache lives, a local folder or an fsspec URL (s3://, gs://, ...), and the few things the
store does there, each with what makes it atomic.

A folder has rename: a record is a temporary file renamed into place, and a new cache a staging
folder renamed into place. An object store has no rename, but a put is atomic per object (an
object is absent or whole, never partial) and listing is strongly consistent; so every record is
one put, and the object whose existence means something (a commit record, the root zarr.json) is
put after everything it vouches for. SPEC.md, "Object stores", is the argument.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vitscope.cache_spec.errors import CacheSpecError
from vitscope.support.records import parse_json, write_atomically

ROOT_META = "zarr.json"
"""The group's metadata: on an object store, its existence is the cache's (it is put last)."""


def is_url(path: str | Path) -> bool:
    """An fsspec URL of a remote store; a plain path or file:// URL is a local folder."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def location_of(path: str | Path) -> LocalFolder | ObjectStore:
    """The cache at `path`: an `ObjectStore` for a URL (its bucket checked now), else a folder."""
    if is_url(path):
        return ObjectStore.connect(str(path))
    return LocalFolder(Path(str(path).removeprefix("file://")))


class LocalFolder:
    """A cache in a folder of the local (or a network) file system."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def zarr_store(self) -> Path:
        return self.path

    def url(self, key: str) -> str:
        """What `read_chunk_file` opens for the object `key`, in any process."""
        return str(self.path / key)

    def exists(self, key: str = "") -> bool:
        return (self.path / key).exists()

    def read(self, key: str) -> bytes:
        return (self.path / key).read_bytes()

    def keys(self, folder: str) -> set[str]:
        """Keys of the files directly in `folder`, read afresh."""
        try:
            return {f"{folder}/{name}" for name in os.listdir(self.path / folder)}
        except FileNotFoundError:
            return set()

    def put(self, key: str, data: bytes) -> None:
        """Temporary file, fsync, rename: readers see the old file or the new one."""
        write_atomically(self.path / key, data)

    def remove(self, key: str) -> None:
        (self.path / key).unlink(missing_ok=True)

    def size(self, folder: str) -> int:
        return sum(f.stat().st_size for f in (self.path / folder).rglob("*") if f.is_file())

    def create(self, build: Callable[[Path], None]) -> None:
        """Build the cache in a hidden staging folder and rename it into place; the first of many
        writers to rename wins, the others drop theirs."""
        staging = self.path.parent / f".{self.path.name}.creating-{os.getpid()}"
        build(staging)
        try:
            os.rename(staging, self.path)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if not self.path.exists():
                raise

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """An exclusive flock on `.append.lock`, serialising writers that grow the shard list."""
        with open(self.path / ".append.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield


class ObjectStore:
    """A cache under a URL of an fsspec object store; credentials and endpoint come from the
    environment (for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL), so that
    every process, forked or started anew, reaches the same store without being handed them."""

    def __init__(self, url: str) -> None:
        import fsspec

        self.path = url.rstrip("/")
        self.fs, self._root = fsspec.core.url_to_fs(self.path)

    @classmethod
    def connect(cls, url: str) -> ObjectStore:
        """Open the store and look its bucket up once (one HEAD), so a missing package, bucket,
        endpoint or credentials is a one-line error naming the URL, not a traceback later."""
        bucket = url.split("://", 1)[1].split("/", 1)[0]
        try:
            store = cls(url)
            store.fs.info(bucket, refresh=True)
        except ImportError as err:
            raise CacheSpecError(
                url, "an fsspec backend for the URL", str(err), fix="pip install 'vitscope[s3]'"
            ) from None
        except FileNotFoundError:
            raise CacheSpecError(
                url, "an existing bucket", f"no bucket {bucket!r}", fix="create it or fix the URL"
            ) from None
        except Exception as err:  # each backend raises its own errors; all mean "unreachable"
            raise CacheSpecError(
                url,
                "a reachable object store with valid credentials",
                f"{type(err).__name__}: {err}",
                fix="set AWS_ENDPOINT_URL (or the backend's endpoint) and the credentials, "
                "e.g. AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
            ) from None
        return store

    def zarr_store(self) -> Any:
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(self.path, read_only=False)

    def url(self, key: str) -> str:
        return f"{self.path}/{key}"

    def exists(self, key: str = "") -> bool:
        """Whether the object `key` (or, for "", anything under the cache's prefix) exists."""
        try:
            if not key:
                return bool(self.fs.ls(self._root, detail=False, refresh=True))
            self.fs.info(self._key(key), refresh=True)
        except FileNotFoundError:
            return False
        return True

    def read(self, key: str) -> bytes:
        return self.fs.cat_file(self._key(key))

    def keys(self, folder: str) -> set[str]:
        """Keys of the objects directly under `folder`, from a fresh listing (never s3fs's
        cache: other writers commit meanwhile)."""
        try:
            listed = self.fs.ls(self._key(folder), detail=False, refresh=True)
        except FileNotFoundError:
            return set()
        return {f"{folder}/{name.rsplit('/', 1)[-1]}" for name in listed}

    def put(self, key: str, data: bytes) -> None:
        """One put: atomic per object, so readers see the old object or the new one."""
        self.fs.pipe_file(self._key(key), data)

    def remove(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._key(key))

    def size(self, folder: str) -> int:
        return int(self.fs.du(self._key(folder)))

    def create(self, build: Callable[[Path], None]) -> None:
        """What replaces the staging folder's rename: build the group locally, put every object
        but the root zarr.json, then that one last; its existence is the cache's. Writers that
        create at once with one set of settings put the same bytes, in the same order."""
        if self.exists(ROOT_META):
            return
        with tempfile.TemporaryDirectory() as staging:
            root = Path(staging, "cache")
            build(root)
            keys = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
            for key in sorted(keys, key=lambda k: k == ROOT_META):  # stable: the root goes last
                self.fs.put_file(str(root / key), self._key(key))

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """No lock: an object store has none to offer. SPEC.md: one writer at a time may grow
        the shard list of a cache on an object store."""
        yield

    def _key(self, key: str) -> str:
        return f"{self._root}/{key}" if key else self._root


def read_json(location: LocalFolder | ObjectStore, key: str) -> Any:
    """A JSON record of the cache, or a `CacheSpecError` naming its path or URL."""
    where = location.url(key)
    try:
        text = location.read(key).decode()
    except FileNotFoundError:
        raise CacheSpecError(where, "a file", "nothing") from None
    return parse_json(text, where, CacheSpecError)


def put_json(location: LocalFolder | ObjectStore, key: str, data: Any) -> None:
    location.put(key, json.dumps(data, indent=2).encode())
