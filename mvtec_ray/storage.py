"""Local folders and S3 buckets behind one small API (pyarrow.fs).

Paths are URIs: a local path or ``s3://bucket/prefix``. A :class:`Storage` is cheap to
pickle (it carries settings, not connections), so Ray tasks on other nodes rebuild the
filesystem with the same credentials; secrets stay in ``SecretStr`` and are never logged.
"""
from __future__ import annotations

import os
import posixpath
import re
import stat
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pyarrow.fs as pafs

from mvtec_ray.config import S3Settings
from mvtec_ray.errors import StorageAccessDenied, StorageError, StorageUnavailable

T = TypeVar("T")


class TooLarge(ValueError):
    """A file longer than the ``max_bytes`` of a bounded :meth:`Storage.read_bytes`."""

# pyarrow reports a bodiless 5xx as "AWS Error UNKNOWN (HTTP status 503)"; bare numbers are not
# markers (a key name like part-500.png must not make an access error look transient)
_TRANSIENT_MARKERS = ("SLOW_DOWN", "SlowDown", "Throttl", "INTERNAL_FAILURE", "InternalError",
                      "SERVICE_UNAVAILABLE", "ServiceUnavailable", "HTTP status 5", "HTTP status 429",
                      "Connection reset", "RequestTimeout", "timed out", "NETWORK_CONNECTION")
# the credentials were refused (S3's wording; a local permission error is a per-file problem, not these)
_ACCESS_DENIED_MARKERS = ("ACCESS_DENIED", "AccessDenied", "HTTP status 403", "HTTP status 401",
                          "InvalidAccessKeyId", "INVALID_ACCESS_KEY_ID", "SignatureDoesNotMatch",
                          "SIGNATURE_DOES_NOT_MATCH", "ExpiredToken", "EXPIRED_TOKEN", "TokenRefreshRequired",
                          "InvalidToken", "INVALID_CLIENT_TOKEN_ID", "MISSING_AUTHENTICATION_TOKEN",
                          "REQUEST_EXPIRED", "RequestTimeTooSkewed", "REQUEST_TIME_TOO_SKEWED")


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def join(base: str, *parts: str) -> str:
    if is_s3(base):
        return posixpath.join(base, *parts)
    return str(Path(base, *parts))


def safe_join(base: str, relative: str) -> str:
    """Join ``relative`` under ``base``, refusing anything that would escape it."""
    rel = relative.replace("\\", "/")
    normal = posixpath.normpath(rel)
    if rel.startswith("/") or normal == ".." or normal.startswith("../") or "\x00" in rel:
        raise StorageError(f"refusing path {relative!r}: it escapes {base}")
    return join(base, normal)


@dataclass
class Storage:
    """Resolves URIs to (filesystem, path) pairs; retries transient S3 errors."""

    s3: S3Settings = field(default_factory=S3Settings)
    _fs_cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __getstate__(self) -> dict:
        return {"s3": self.s3}

    def __setstate__(self, state: dict) -> None:
        self.s3 = state["s3"]
        self._fs_cache = {}

    # -- resolution ------------------------------------------------------
    def resolve(self, uri: str) -> tuple[pafs.FileSystem, str]:
        uri = str(uri)
        if is_s3(uri):
            return self._s3(), uri[len("s3://"):].rstrip("/")
        return self._local(), os.path.abspath(os.path.expanduser(uri))

    def _local(self) -> pafs.FileSystem:
        if "local" not in self._fs_cache:
            self._fs_cache["local"] = pafs.LocalFileSystem()
        return self._fs_cache["local"]

    def _s3(self, attempts: int | None = None) -> pafs.FileSystem:
        attempts = attempts or self.s3.max_attempts
        key = f"s3-{attempts}"
        if key not in self._fs_cache:
            s = self.s3
            kwargs: dict = {
                "region": s.region or "us-east-1",
                "connect_timeout": s.connect_timeout_s,
                "request_timeout": s.request_timeout_s,
                # the only retry layer: per request, with the SDK's backoff (throttling, 5xx, network)
                "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=attempts),
            }
            if s.endpoint_url:
                scheme, _, rest = s.endpoint_url.partition("://")
                kwargs["endpoint_override"] = rest or scheme
                kwargs["scheme"] = scheme if rest else "https"
            if s.anonymous:
                kwargs["anonymous"] = True
            elif s.access_key and s.secret_key:
                kwargs["access_key"] = s.access_key
                kwargs["secret_key"] = s.secret_key.get_secret_value()
                if s.session_token:
                    kwargs["session_token"] = s.session_token.get_secret_value()
            self._fs_cache[key] = pafs.S3FileSystem(**kwargs)
        return self._fs_cache[key]

    # -- operations --------------------------------------------------------
    def retry(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` (whose S3 requests the SDK already retried) and translate its errors: transient
        ones (throttling, 5xx, network) to :class:`StorageUnavailable`, refused credentials (403, expired
        token) to :class:`StorageAccessDenied`, the rest to :class:`StorageError`."""
        try:
            return fn()
        except FileNotFoundError:
            raise
        except OSError as exc:
            message = str(exc)
            error = StorageUnavailable if is_transient(message) else \
                StorageAccessDenied if is_access_denied(message) else StorageError
            raise error(f"{what}: {describe_storage_error(message)}") from None

    def read_bytes(self, uri: str, max_bytes: int | None = None, head: Callable[[bytes], object] | None = None,
                   head_bytes: int = 64) -> bytes:
        """The whole file. ``head``: called on its first ``head_bytes`` before the rest is read (on
        S3 a ranged read; an exception it raises stops the read). ``max_bytes``: at most that many
        bytes are read; a longer file raises :class:`TooLarge`."""
        fs, path = self.resolve(uri)

        def read() -> bytes:
            with fs.open_input_stream(path) as handle:
                first = b""
                if head is not None:
                    first = handle.read(head_bytes)
                    head(first)
                if max_bytes is None:
                    return first + handle.read()
                data = first + handle.read(max_bytes + 1 - len(first))
                if len(data) > max_bytes:
                    raise TooLarge(f"over {max_bytes} bytes")
                return data
        return self.retry(f"cannot read {uri}", read)

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write atomically: a temporary name renamed into place (S3 puts are atomic already)."""
        fs, path = self.resolve(uri)
        parent = posixpath.dirname(path) if is_s3(uri) else os.path.dirname(path)
        self.retry(f"cannot create {parent}", lambda: fs.create_dir(parent, recursive=True))
        if is_s3(uri):
            def put() -> None:
                with fs.open_output_stream(path) as handle:
                    handle.write(data)
            self.retry(f"cannot write {uri}", put)
            return
        def put_local() -> None:
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                with fs.open_output_stream(tmp) as handle:
                    handle.write(data)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)  # a failed write leaves nothing behind
        self.retry(f"cannot write {uri}", put_local)

    def exists(self, uri: str) -> bool:
        fs, path = self.resolve(uri)
        info = self.retry(f"cannot reach {uri}", lambda: fs.get_file_info(path))
        return info.type != pafs.FileType.NotFound

    def is_dir(self, uri: str) -> bool:
        fs, path = self.resolve(uri)
        info = self.retry(f"cannot reach {uri}", lambda: fs.get_file_info(path))
        return info.type == pafs.FileType.Directory

    def list(self, uri: str, recursive: bool = False) -> list[pafs.FileInfo]:
        fs, path = self.resolve(uri)
        selector = pafs.FileSelector(path, recursive=recursive, allow_not_found=True)
        return self.retry(f"cannot list {uri}", lambda: fs.get_file_info(selector))

    def iter_files(self, uri: str) -> Iterator[pafs.FileInfo]:
        yield from self.walk(uri)[0]

    def walk(self, uri: str) -> tuple[list[pafs.FileInfo], list[tuple[str, str]]]:
        """Regular files under ``uri``, and (path, reason) for every entry that is not one
        (:meth:`iter_walk` gathered; S3 in one recursive listing)."""
        if is_s3(uri):
            infos = self.list(uri, recursive=True)
            return [i for i in infos if i.type == pafs.FileType.File], []
        files: list[pafs.FileInfo] = []
        special: list[tuple[str, str]] = []
        for info, path, reason in self.iter_walk(uri):
            if info is not None:
                files.append(info)
            else:
                special.append((path, reason))
        return files, special

    def iter_walk(self, uri: str) -> Iterator[tuple[pafs.FileInfo | None, str, str]]:
        """The one safe walk: ``(info, path, "")`` per regular file, ``(None, path, reason)`` per
        entry that is not one, folder by folder (memory: the largest folder, not the tree).

        Local folders: symlinks are followed, but every folder is listed once (pyarrow's own
        recursive listing loops through symlink cycles and silently drops broken links and
        fifos); a symlink to a regular file counts as that file. S3: one listing per prefix.
        """
        if is_s3(uri):
            stack = [uri]
            while stack:
                folder = stack.pop()
                subfolders = []
                for info in sorted(self.list(folder), key=lambda i: i.path):
                    if info.type == pafs.FileType.Directory:
                        subfolders.append(self.uri_of(uri, info.path))
                    elif info.type == pafs.FileType.File:
                        yield info, info.path, ""
                stack.extend(reversed(subfolders))
            return
        _, root = self.resolve(uri)
        special: list[tuple[str, str]] = []

        def unlistable(exc: OSError) -> None:
            if exc.filename and os.path.abspath(exc.filename) != root:
                special.append((exc.filename, f"folder cannot be listed: {exc.strerror or exc}"))

        if not os.path.isdir(root):
            return
        seen = {_inode(root)}
        for folder, dirs, names in os.walk(root, onerror=unlistable, followlinks=True):
            while special:
                yield None, *special.pop(0)
            dirs.sort()
            for name in list(dirs):
                path = os.path.join(folder, name)
                if not _is_utf8(path):
                    dirs.remove(name)
                    yield None, printable_path(path), "folder name is not valid UTF-8 (rename the folder)"
                    continue
                key = _inode(path)
                if key in seen:
                    dirs.remove(name)
                    yield None, path, "folder listed already through another path (symlink loop or duplicate)"
                seen.add(key)
            for name in sorted(names):
                path = os.path.join(folder, name)
                if not _is_utf8(path):  # bytes from another encoding: Arrow, Parquet and S3 need UTF-8
                    yield None, printable_path(path), "file name is not valid UTF-8 (rename the file)"
                    continue
                try:
                    st = os.stat(path)  # follows a file symlink
                except OSError:
                    yield None, path, "broken symbolic link" if os.path.islink(path) else "file cannot be read"
                    continue
                if stat.S_ISREG(st.st_mode):
                    yield pafs.FileInfo(path, pafs.FileType.File, mtime_ns=st.st_mtime_ns, size=st.st_size), path, ""
                else:
                    yield None, path, "not a regular file (fifo, socket or device)"
        while special:
            yield None, *special.pop(0)

    def version_of(self, uri: str, info: pafs.FileInfo) -> str:
        """The one version string of a listed file (``uri``: the file's, or the folder's it was listed under).

        Local files: size, mtime, inode and ctime (``cp -p`` and ``rsync -t`` keep the size and mtime
        but always make a new inode or ctime; so does any write, rename over or ``chmod``). S3: size and
        LastModified (pyarrow's listing gives no ETag; LastModified has 1 s resolution, so an object
        replaced by one of the same size within the same second keeps its version).
        """
        size, mtime = int(info.size or 0), int(info.mtime_ns or 0)
        if is_s3(uri):
            return f"{size}-{mtime}"
        try:
            st = os.stat(info.path)
        except OSError:
            return f"{size}-{mtime}"  # gone since the listing: reading it will say so
        return f"{st.st_size}-{st.st_mtime_ns}-{st.st_ino}-{st.st_ctime_ns}"

    def delete_dir(self, uri: str) -> None:
        fs, path = self.resolve(uri)
        if self.exists(uri):
            self.retry(f"cannot delete {uri}", lambda: fs.delete_dir(path))

    def delete_file(self, uri: str) -> None:
        fs, path = self.resolve(uri)
        self.retry(f"cannot delete {uri}", lambda: fs.delete_file(path))

    def uri_of(self, original: str, path: str) -> str:
        """Turn a filesystem path from a listing back into a URI of the same kind as ``original``."""
        return f"s3://{path}" if is_s3(original) else path

    def check_reachable(self, uri: str) -> None:
        """Fail early, with a message a person can act on, when ``uri`` cannot be listed."""
        if is_s3(uri):
            fs, path = self._s3(attempts=1), uri[len("s3://"):].rstrip("/")  # a preflight fails fast
        else:
            fs, path = self.resolve(uri)
        info = self.retry(f"cannot reach {uri}", lambda: fs.get_file_info(path))
        if info.type == pafs.FileType.NotFound:
            if is_s3(uri):
                bucket = path.split("/", 1)[0]
                bucket_info = self.retry(f"cannot reach {uri}", lambda: fs.get_file_info(bucket))
                if bucket_info.type == pafs.FileType.NotFound:
                    raise StorageError(f"bucket {bucket!r} does not exist (or is not visible with these credentials)")
            raise StorageError(f"not found: {uri}")


def _is_utf8(path: str) -> bool:
    try:
        path.encode("utf-8")  # undecodable bytes arrive as lone surrogates (PEP 383)
        return True
    except UnicodeEncodeError:
        return False


def printable_path(path: str) -> str:
    """``path`` with undecodable bytes shown as ``\\xNN`` (identical for valid UTF-8 names)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


#: characters a terminal acts on instead of showing: C0/C1 controls (ESC, CSI, BEL, CR, ...) but
#: newline and tab, and the bidirectional overrides that reorder what is shown
_TERMINAL_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable_text(text: str) -> str:
    """``text`` safe to print on a terminal: undecodable bytes and control characters (a file or
    category name holding ``\\x1b[2J``) shown as ``\\xNN`` / ``\\uNNNN`` escapes, newlines and tabs kept."""
    text = str(text)
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate outside the surrogateescape range
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return _TERMINAL_CONTROLS.sub(
        lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256 else f"\\u{ord(m.group()):04x}", text)


def _inode(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def is_transient(message: str) -> bool:
    """Worth retrying: throttling, 5xx, timeouts, network errors (an endpoint may come back)."""
    return any(m in message for m in _TRANSIENT_MARKERS)


def is_access_denied(message: str) -> bool:
    """The storage refused the credentials (403, expired or invalid token): fatal for a whole run."""
    return any(m in message for m in _ACCESS_DENIED_MARKERS)


def describe_storage_error(message: str) -> str:
    """Short, secret-free reason for a pyarrow/AWS error message."""
    text = " ".join(message.split())
    rules = [
        (_ACCESS_DENIED_MARKERS, "access denied (check the credentials, their expiry and the bucket policy)"),
        (("NoSuchBucket", "NO_SUCH_BUCKET"), "the bucket does not exist"),
        (("NETWORK_CONNECTION", "Connection refused", "Couldn't connect", "Could not connect",
          "curlCode: 7", "Failed to connect"), "the S3 endpoint cannot be reached (connection refused or down)"),
        (("RequestTimeout", "timed out", "curlCode: 28"), "the S3 endpoint timed out"),
        (("SLOW_DOWN", "SlowDown", "Throttl", "HTTP status 429"), "throttled by S3 (retries exhausted)"),
        (("INTERNAL_FAILURE", "InternalError", "SERVICE_UNAVAILABLE", "ServiceUnavailable", "HTTP status 5"),
         "the S3 endpoint keeps answering with server errors{code} (retries exhausted)"),
    ]
    status = re.search(r"HTTP status (\d{3})", text)
    code = f", HTTP {status.group(1)}" if status else ""
    for markers, reason in rules:
        if any(m in text for m in markers):
            return reason.format(code=code)
    return text[:300]
