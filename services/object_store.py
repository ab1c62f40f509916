"""Object store: one interface, two backends.

`LocalFolderStore` keeps objects as files under a folder (the embedded mode);
`S3Store` talks to MinIO or any S3 through the `minio` client. Keys are
"/"-separated relative paths such as `clients/3/updates/ab12/adapter.safetensors`
and are validated identically for both, so data can move between backends.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import http.client
import io
import os
import shutil
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import BinaryIO, Protocol

import certifi
import urllib3
from minio import Minio
from minio.error import MinioException, S3Error

from services import metrics

__all__ = [
    "LocalFolderStore",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectStore",
    "ObjectStoreError",
    "ObjectTooLarge",
    "S3Store",
    "open_object_store",
    "validate_key",
]

# Temp files of in-flight writes carry this name prefix; list() skips them and keys may
# not use it, so a half-written object can never be mistaken for a real one.
TMP_PREFIX = ".tmp-"
_CHUNK = 1024 * 1024
_HUGE_BUFFER = 4 * 1024 * 1024  # and above: a buffer with huge pages (`_buffer`)
_S3_MISSING_CODES = frozenset({"NoSuchKey", "NoSuchObject"})


@dataclasses.dataclass(frozen=True)
class ObjectInfo:
    """One listed object: its key, size in bytes and last write (time-zone aware, UTC)."""

    key: str
    size: int
    last_modified: datetime


class ObjectStoreError(Exception):
    """Any backend failure; the message names the key and the store."""


class ObjectNotFound(ObjectStoreError):
    """The key has no object in the store."""


class ObjectTooLarge(ObjectStoreError):
    """The object is bigger than the reader's limit. `size` is its declared size, or None
    when the store did not declare one and the limit was passed while reading."""

    def __init__(self, message: str, *, size: int | None, limit: int) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit


class TransientStoreError(ObjectStoreError):
    """The store could not be reached or was busy: trying again later may succeed."""


# S3 answers that mean "busy or down for now", not "your request is wrong"
_S3_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "InternalError",
        "ServiceUnavailable",
        "RequestTimeout",
        "XMinioServerNotInitialized",
    }
)


def validate_key(key: str) -> str:
    """Return `key` if it is a clean relative "/"-separated path, else raise ValueError."""
    if not isinstance(key, str):
        raise ValueError(f"object key must be a str, got {type(key).__name__}")
    if not key:
        raise ValueError("object key must not be empty")
    if "\x00" in key:
        raise ValueError(f"object key {key!r} contains a NUL character")
    if "\\" in key:
        raise ValueError(f"object key {key!r} contains a backslash; use '/' as separator")
    if key.startswith("/"):
        raise ValueError(f"object key {key!r} must be relative (no leading '/')")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise ValueError(f"object key {key!r} has an empty, '.' or '..' segment")
        if segment.startswith(TMP_PREFIX):
            raise ValueError(f"object key {key!r} uses the reserved prefix {TMP_PREFIX!r}")
    return key


def _is_valid_key(key: str) -> bool:
    try:
        validate_key(key)
    except ValueError:
        return False
    return True


def _atomic_write(path: str, fill: Callable[[BinaryIO], object]) -> None:
    """Write `path` via a temp file in the same folder + os.replace (same filesystem)."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=folder)
    try:
        with os.fdopen(fd, "wb") as out:
            fill(out)
            out.flush()
            # fsync so a crash after the rename cannot leave an empty/short object.
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _what(action: str, key: str) -> str:
    return f"{action} {key!r}" if key else action


def _copy_stream(src: BinaryIO, out: BinaryIO) -> None:
    shutil.copyfileobj(src, out, _CHUNK)


class _Body(Protocol):
    """What `_read_bounded` reads from: `read(n)` returns up to n bytes (b"" at the end),
    `readinto(view)` fills the start of `view` and returns how many bytes it wrote."""

    def read(self, n: int, /) -> bytes: ...

    def readinto(self, view: memoryview, /) -> int: ...


def _buffer(size: int) -> memoryview:
    """A writable buffer of `size` bytes, to be filled whole. Big ones come from numpy,
    which asks Linux for transparent huge pages: filling 64 MiB then takes 32 page faults
    instead of 16,384 (about 25 ms less). numpy's allocations show in tracemalloc as a
    bytearray's do."""
    if size >= _HUGE_BUFFER:
        import numpy  # with torch, already loaded where adapters are read

        return memoryview(numpy.empty(size, numpy.uint8))
    return memoryview(bytearray(size))


def _read_bounded(
    body: _Body,
    declared: int | None,
    max_bytes: int,
    on_chunk: Callable[[memoryview], object] | None,
    what: str,
) -> memoryview:
    """Read a whole object body into one writable buffer, at most `max_bytes` of it.

    With a declared size (Content-Length, a file's size) an object over the limit is refused
    before a byte is read, and the body goes straight into a buffer of exactly that size;
    a body that ends early or runs on past the declared size is an error. Without one the
    body is read in chunks and refused as soon as more than `max_bytes` have arrived."""
    if declared is not None:
        if declared > max_bytes:
            raise ObjectTooLarge(
                f"{what} is {declared} bytes, over the limit of {max_bytes}",
                size=declared,
                limit=max_bytes,
            )
        view = _buffer(declared)
        pos = 0
        while pos < declared:
            piece = view[pos : pos + _CHUNK]
            n = body.readinto(piece)
            if not n:
                raise ObjectStoreError(f"{what} ended after {pos} of its {declared} bytes")
            if on_chunk is not None:
                on_chunk(piece[:n].toreadonly())
            pos += n
        if body.read(1):
            raise ObjectStoreError(f"{what} is longer than its declared {declared} bytes")
        return view
    buf = bytearray()
    while chunk := body.read(_CHUNK):
        if len(buf) + len(chunk) > max_bytes:
            raise ObjectTooLarge(
                f"{what} is over the limit of {max_bytes} bytes", size=None, limit=max_bytes
            )
        if on_chunk is not None:
            on_chunk(memoryview(chunk))
        buf += chunk
    return memoryview(buf)


def _record(operation: str, nbytes: int, t0: float) -> None:
    metrics.OBJECT_STORE_BYTES.labels(operation=operation).inc(nbytes)
    metrics.OBJECT_STORE_SECONDS.labels(operation=operation).observe(time.perf_counter() - t0)


class ObjectStore(abc.ABC):
    """Key -> bytes store. Writes are atomic: readers see the old or the new object.

    The transfers are timed and counted here, once for every backend; the backends
    implement `_put`, `_put_file`, `_get`, `_get_bounded` and `_get_file`. Failed transfers
    are not recorded (their latency says nothing about the store's throughput)."""

    def put(self, key: str, data: bytes) -> None:
        t0 = time.perf_counter()
        self._put(key, data)
        _record("put", len(data), t0)

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        """Upload a file from disk without reading it whole into memory."""
        t0 = time.perf_counter()
        self._put_file(key, path)
        _record("put", os.path.getsize(path), t0)

    def get(self, key: str) -> bytes:
        """Raises ObjectNotFound."""
        t0 = time.perf_counter()
        data = self._get(key)
        _record("get", len(data), t0)
        return data

    def get_bounded(
        self,
        key: str,
        max_bytes: int,
        on_chunk: Callable[[memoryview], object] | None = None,
    ) -> memoryview:
        """The object in one writable buffer (no second copy), read only if it fits in
        `max_bytes`:
        an object the store declares bigger is refused before any of it is read, and one
        without a declared size as soon as the limit is passed (ObjectTooLarge either way).
        `on_chunk` (e.g. a hash's update) sees each piece as it arrives: a read-only view of
        the returned buffer (or of a chunk of its own), so it may be kept. Raises
        ObjectNotFound."""
        t0 = time.perf_counter()
        data = self._get_bounded(key, max_bytes, on_chunk)
        _record("get", len(data), t0)
        return data

    def get_file(self, key: str, path: str | os.PathLike) -> None:
        """Stream to `path` atomically; raises ObjectNotFound (and then writes nothing)."""
        t0 = time.perf_counter()
        self._get_file(key, path)
        _record("get", os.path.getsize(path), t0)

    @abc.abstractmethod
    def _put(self, key: str, data: bytes) -> None: ...

    @abc.abstractmethod
    def _put_file(self, key: str, path: str | os.PathLike) -> None: ...

    @abc.abstractmethod
    def _get(self, key: str) -> bytes: ...

    @abc.abstractmethod
    def _get_bounded(
        self, key: str, max_bytes: int, on_chunk: Callable[[memoryview], object] | None
    ) -> memoryview: ...

    @abc.abstractmethod
    def _get_file(self, key: str, path: str | os.PathLike) -> None: ...

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def size(self, key: str) -> int:
        """Raises ObjectNotFound."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """All keys starting with `prefix` (plain string prefix, recursive), sorted."""

    @abc.abstractmethod
    def list_info(self, prefix: str = "") -> list[ObjectInfo]:
        """As `list`, with each object's size and last-modified time, sorted by key."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Deleting a missing key is not an error."""

    @abc.abstractmethod
    def describe(self) -> str: ...

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"

    def _not_found(self, key: str) -> ObjectNotFound:
        return ObjectNotFound(f"object {key!r} not found in {self.describe()}")

    def _object(self, key: str) -> str:
        return f"object {key!r} in {self.describe()}"


class LocalFolderStore(ObjectStore):
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = os.path.abspath(os.fspath(root))
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as exc:
            raise ObjectStoreError(f"cannot create object folder {self.root}: {exc}") from exc

    def describe(self) -> str:
        return f"local folder {self.root}"

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *validate_key(key).split("/"))

    @contextlib.contextmanager
    def _errors(self, action: str, key: str) -> Iterator[None]:
        try:
            yield
        except ObjectStoreError:
            raise
        except OSError as exc:
            raise ObjectStoreError(
                f"{_what(action, key)} in {self.describe()} failed: {exc}"
            ) from exc

    def _put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        with self._errors("put", key):
            _atomic_write(path, lambda out: out.write(data))

    def _put_file(self, key: str, path: str | os.PathLike) -> None:
        dest = self._path(key)
        with self._errors("put_file", key), open(path, "rb") as src:
            _atomic_write(dest, lambda out: _copy_stream(src, out))

    def _open(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        # A directory or a file in place of a parent folder both mean "no such object".
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise self._not_found(key) from None

    def _get(self, key: str) -> bytes:
        with self._errors("get", key):
            with self._open(key) as src:
                return src.read()

    def _get_bounded(
        self, key: str, max_bytes: int, on_chunk: Callable[[memoryview], object] | None
    ) -> memoryview:
        with self._errors("get", key), self._open(key) as src:
            size = os.fstat(src.fileno()).st_size
            return _read_bounded(src, size, max_bytes, on_chunk, self._object(key))

    def _get_file(self, key: str, path: str | os.PathLike) -> None:
        with self._errors("get_file", key):
            # Open the source first so a missing key leaves nothing behind at `path`.
            with self._open(key) as src:
                _atomic_write(os.fspath(path), lambda out: _copy_stream(src, out))

    def exists(self, key: str) -> bool:
        return os.path.isfile(self._path(key))

    def size(self, key: str) -> int:
        path = self._path(key)
        with self._errors("size", key):
            if not os.path.isfile(path):
                raise self._not_found(key)
            return os.path.getsize(path)

    def _walk(self, prefix: str) -> Iterator[tuple[str, str]]:
        """(key, path) of every object whose key starts with `prefix`, unsorted."""
        # Walk only the folder the prefix names (when it is a valid key path) and filter by
        # plain string prefix, matching S3 semantics ("a/1" also matches "a/10/x").
        base, _, _ = prefix.rpartition("/")
        top = self._path(base) if base and _is_valid_key(base) else self.root
        for folder, dirs, files in os.walk(top):
            dirs[:] = [d for d in dirs if not d.startswith(TMP_PREFIX)]
            rel = os.path.relpath(folder, self.root)
            parts = [] if rel == "." else rel.split(os.sep)
            for name in files:
                if name.startswith(TMP_PREFIX):
                    continue
                key = "/".join([*parts, name])
                if key.startswith(prefix):
                    yield key, os.path.join(folder, name)

    def list(self, prefix: str = "") -> list[str]:
        with self._errors("list", prefix):
            keys = [key for key, _ in self._walk(prefix)]
        keys.sort()
        return keys

    def list_info(self, prefix: str = "") -> list[ObjectInfo]:
        infos: list[ObjectInfo] = []
        with self._errors("list", prefix):
            for key, path in self._walk(prefix):
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue  # deleted since the walk saw it
                modified = datetime.fromtimestamp(st.st_mtime, UTC)
                infos.append(ObjectInfo(key, st.st_size, modified))
        infos.sort(key=lambda info: info.key)
        return infos

    def delete(self, key: str) -> None:
        path = self._path(key)
        with self._errors("delete", key):
            # Empty parent folders are left in place: removing them could race a
            # concurrent put() that has just created them.
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                if os.path.isdir(path):
                    return  # a folder is not an object
                os.remove(path)


class _S3Body:
    """A GET response as a `_Body`. An object stored with a Content-Encoding is decoded as
    urllib3 does by default; its Content-Length is then not its size, so none is declared.

    Otherwise the body is read with http.client's own readinto, straight into the caller's
    buffer, rather than through urllib3's read (a bytes object per chunk, then a copy).
    urllib3 does not see those reads, so its byte count goes stale: the response is closed
    right after (`S3Store._response`), never read further through urllib3. http.client
    still stops at Content-Length and raises IncompleteRead on a body cut short."""

    def __init__(self, response: urllib3.BaseHTTPResponse) -> None:
        self._response = response
        self._raw = not _content_encoding(response)
        fp = getattr(response, "_fp", None)  # urllib3's own http.client response
        fresh = response.tell() == 0  # nothing read through urllib3 yet
        self._fp = fp if self._raw and fresh and isinstance(fp, http.client.HTTPResponse) else None

    @staticmethod
    def declared_size(response: urllib3.BaseHTTPResponse) -> int | None:
        length = response.headers.get("Content-Length")
        if _content_encoding(response) or length is None or not length.strip().isdigit():
            return None
        return int(length)

    def read(self, n: int) -> bytes:
        if self._fp is not None:
            return self._fp.read(n)
        if self._raw:
            return self._response.read(n, decode_content=False)
        return self._response.read(n)

    def readinto(self, view: memoryview) -> int:
        if self._fp is not None:
            return self._fp.readinto(view)
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)


def _content_encoding(response: urllib3.BaseHTTPResponse) -> str:
    encoding = response.headers.get("Content-Encoding", "").strip().lower()
    return "" if encoding == "identity" else encoding


class S3Store(ObjectStore):
    def __init__(
        self,
        endpoint: str,
        bucket: str,
        access_key: str,
        secret_key: str,
        *,
        secure: bool = False,
        region: str | None = None,
        prefix: str = "",
    ) -> None:
        # Tolerate "http(s)://host:port" although minio wants bare "host:port".
        for scheme, is_secure in (("https://", True), ("http://", False)):
            if endpoint.startswith(scheme):
                endpoint, secure = endpoint[len(scheme) :], is_secure
        self.endpoint = endpoint.rstrip("/")
        self.bucket = bucket
        self.secure = secure
        prefix = prefix.strip("/")
        self.prefix = validate_key(prefix) + "/" if prefix else ""
        if not bucket:
            raise ValueError("S3 bucket name must not be empty")
        # Same settings as minio's default client, but a short connect timeout: an
        # unreachable endpoint should fail in seconds, not after 5 minutes per retry.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=10, read=300),
            maxsize=10,
            cert_reqs="CERT_REQUIRED",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
            retries=urllib3.Retry(
                total=5, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]
            ),
        )
        try:
            self._client = Minio(
                self.endpoint,
                access_key=access_key or None,
                secret_key=secret_key or None,
                secure=secure,
                region=region or None,
                http_client=http,
            )
        except ValueError as exc:
            raise ValueError(f"invalid S3 endpoint {endpoint!r}: {exc}") from exc
        self._ensure_bucket(region or None)

    def describe(self) -> str:
        scheme = "https" if self.secure else "http"
        text = f"s3 {scheme}://{self.endpoint} bucket {self.bucket}"
        return f"{text} prefix {self.prefix.rstrip('/')}" if self.prefix else text

    def _ensure_bucket(self, region: str | None) -> None:
        with self._errors("create bucket", ""):
            if self._client.bucket_exists(self.bucket):
                return
            try:
                if region:
                    self._client.make_bucket(self.bucket, location=region)
                else:
                    self._client.make_bucket(self.bucket)
            except S3Error as exc:
                # Another process created it between our check and our create.
                if exc.code != "BucketAlreadyOwnedByYou":
                    raise

    def _name(self, key: str) -> str:
        return self.prefix + validate_key(key)

    @contextlib.contextmanager
    def _errors(self, action: str, key: str) -> Iterator[None]:
        try:
            yield
        except ObjectStoreError:
            raise
        except S3Error as exc:
            if exc.code in _S3_MISSING_CODES and key:
                raise self._not_found(key) from None
            kind = TransientStoreError if exc.code in _S3_TRANSIENT_CODES else ObjectStoreError
            raise kind(
                f"{_what(action, key)} in {self.describe()} failed: {exc.code}: {exc.message}"
            ) from exc
        # connection refused, reset, a body cut short (urllib3 or http.client)...
        except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError) as exc:
            raise TransientStoreError(
                f"{_what(action, key)} in {self.describe()} failed: {type(exc).__name__}: {exc}"
            ) from exc
        except MinioException as exc:
            raise ObjectStoreError(
                f"{_what(action, key)} in {self.describe()} failed: {type(exc).__name__}: {exc}"
            ) from exc

    def _put(self, key: str, data: bytes) -> None:
        name = self._name(key)
        with self._errors("put", key):
            # A single PUT of known length: S3 makes it visible atomically.
            self._client.put_object(self.bucket, name, io.BytesIO(data), len(data))

    def _put_file(self, key: str, path: str | os.PathLike) -> None:
        name = self._name(key)
        with self._errors("put_file", key):
            # fput_object reads part by part and switches to multipart above 5 MiB.
            self._client.fput_object(self.bucket, name, os.fspath(path))

    @contextlib.contextmanager
    def _response(self, name: str) -> Iterator[urllib3.BaseHTTPResponse]:
        response = self._client.get_object(self.bucket, name)
        try:
            yield response
        finally:
            response.close()
            response.release_conn()

    def _get(self, key: str) -> bytes:
        name = self._name(key)
        with self._errors("get", key), self._response(name) as response:
            return response.read()

    def _get_bounded(
        self, key: str, max_bytes: int, on_chunk: Callable[[memoryview], object] | None
    ) -> memoryview:
        # One GET: its Content-Length is the size check (no HEAD first), made before any of
        # the body is read; closing the response unread drops the rest.
        name = self._name(key)
        with self._errors("get", key), self._response(name) as response:
            return _read_bounded(
                _S3Body(response),
                _S3Body.declared_size(response),
                max_bytes,
                on_chunk,
                self._object(key),
            )

    def _get_file(self, key: str, path: str | os.PathLike) -> None:
        name = self._name(key)
        with self._errors("get_file", key), self._response(name) as response:
            # The GET has already succeeded here, so a missing key creates no file; urllib3
            # checks Content-Length, so a cut-off download raises instead of landing short.
            def fill(out: BinaryIO) -> None:
                for chunk in response.stream(_CHUNK):
                    out.write(chunk)

            _atomic_write(os.fspath(path), fill)

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except ObjectNotFound:
            return False
        return True

    def size(self, key: str) -> int:
        name = self._name(key)
        with self._errors("size", key):
            return int(self._client.stat_object(self.bucket, name).size or 0)

    def list(self, prefix: str = "") -> list[str]:
        with self._errors("list", prefix):
            objects = self._client.list_objects(
                self.bucket, prefix=self.prefix + prefix, recursive=True
            )
            keys = [obj.object_name[len(self.prefix) :] for obj in objects if obj.object_name]
        keys.sort()
        return keys

    def list_info(self, prefix: str = "") -> list[ObjectInfo]:
        infos: list[ObjectInfo] = []
        with self._errors("list", prefix):
            # A recursive listing carries each object's size and last-modified time: no
            # request per object.
            for obj in self._client.list_objects(
                self.bucket, prefix=self.prefix + prefix, recursive=True
            ):
                if not obj.object_name or obj.is_dir:
                    continue
                # no time given: call it new, so age-based cleanup leaves it alone
                modified = obj.last_modified or datetime.now(UTC)
                if modified.tzinfo is None:
                    modified = modified.replace(tzinfo=UTC)
                infos.append(
                    ObjectInfo(obj.object_name[len(self.prefix) :], int(obj.size or 0), modified)
                )
        infos.sort(key=lambda info: info.key)
        return infos

    def delete(self, key: str) -> None:
        name = self._name(key)
        try:
            with self._errors("delete", key):
                self._client.remove_object(self.bucket, name)
        except ObjectNotFound:
            pass  # S3 normally answers 204 for a missing key; some servers say NoSuchKey


def open_object_store(
    url: str,
    *,
    s3_endpoint: str | None = None,
    s3_access_key: str | None = None,
    s3_secret_key: str | None = None,
    s3_secure: bool = False,
    s3_region: str | None = None,
) -> ObjectStore:
    """A path or file:///abs/path -> LocalFolderStore; s3://bucket[/prefix] -> S3Store."""
    if not url:
        raise ValueError("object store URL must not be empty")
    if "://" not in url:
        return LocalFolderStore(url)
    parsed = urllib.parse.urlsplit(url)
    scheme = parsed.scheme.lower()
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"file URL {url!r} must be file:///absolute/path (no host)")
        path = urllib.parse.unquote(parsed.path)
        if not path:
            raise ValueError(f"file URL {url!r} has no path")
        return LocalFolderStore(path)
    if scheme == "s3":
        bucket = parsed.netloc
        if not bucket:
            raise ValueError(f"S3 URL {url!r} has no bucket; expected s3://bucket[/prefix]")
        if not s3_endpoint:
            raise ValueError(
                f"object store {url!r} is on S3 but no S3 endpoint (host:port) was given; "
                "set the s3 endpoint setting (e.g. FEDVEC_S3_ENDPOINT=127.0.0.1:9000)"
            )
        return S3Store(
            s3_endpoint,
            bucket,
            s3_access_key or "",
            s3_secret_key or "",
            secure=s3_secure,
            region=s3_region or None,
            prefix=urllib.parse.unquote(parsed.path).strip("/"),
        )
    raise ValueError(
        f"unsupported object store URL {url!r}: use a path, file:///path or s3://bucket[/prefix]"
    )
