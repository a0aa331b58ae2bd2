"""One file interface for local paths and gs:// URLs.

gs:// goes through google-cloud-storage; `STORAGE_EMULATOR_HOST` (e.g. gcp-storage-emulator on
127.0.0.1) is honoured with anonymous credentials, which is how the tests run it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterator


def is_gcs(path: str) -> bool:
    return str(path).startswith("gs://")


def join(base: str, *parts: str) -> str:
    base = str(base)
    if is_gcs(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def _split_gcs(path: str) -> tuple[str, str]:
    rest = path[len("gs://"):]
    bucket, _, blob = rest.partition("/")
    if not bucket:
        raise ValueError(f"{path!r}: expected gs://bucket/path")
    return bucket, blob


@functools.lru_cache(maxsize=None)
def _client(emulator: str | None):
    from google.cloud import storage as gcs
    if emulator:
        from google.auth.credentials import AnonymousCredentials
        return gcs.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT", "automem"),
                          credentials=AnonymousCredentials())
    return gcs.Client()


def _blob(path: str):
    bucket, name = _split_gcs(path)
    return _client(os.environ.get("STORAGE_EMULATOR_HOST")).bucket(bucket).blob(name)


def exists(path: str) -> bool:
    if is_gcs(path):
        if _blob(path).exists():
            return True
        return bool(listdir(path))
    return os.path.exists(path)


def read_bytes(path: str) -> bytes:
    if is_gcs(path):
        from google.api_core import exceptions
        try:
            return _blob(path).download_as_bytes()
        except exceptions.NotFound:
            raise FileNotFoundError(path) from None
    with open(path, "rb") as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


_NO_DEFAULT = object()


def read_json(path: str, *, missing: str = "", error: type[Exception] = ValueError, default=_NO_DEFAULT):
    """The parsed JSON file. Missing: ``default`` when given, else FileNotFoundError naming the path
    (and ``missing``, what the caller expected there). Not JSON: ``error`` naming the path."""
    try:
        text = read_text(path)
    except FileNotFoundError:
        if default is not _NO_DEFAULT:
            return default
        raise FileNotFoundError(f"{path}: {missing}" if missing else path) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e})") from None


def read_jsonl(path: str) -> list[dict]:
    """The rows of a JSON-lines file (blank lines skipped). Reading stops at the first line that is
    not JSON, with a warning: only a killed writer's last line can be torn."""
    rows = []
    for i, line in enumerate(read_text(path).splitlines()):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            logging.getLogger(__name__).warning("%s: line %d is not JSON; the rest of the file is ignored",
                                                path, i + 1)
            break
    return rows


_SHARED: list[str] = []  # folders only the primary host writes (the run's workdir)


def share(root: str) -> None:
    """Declares `root` shared by every host: from then on a write under it from any host but
    process 0 raises, so a missed writer check fails loudly instead of racing process 0."""
    root = str(root).rstrip("/") if is_gcs(root) else os.path.abspath(root)
    if root not in _SHARED:
        _SHARED.append(root)


def _check_writer(path: str) -> None:
    if not _SHARED or primary_host():
        return
    p = str(path) if is_gcs(path) else os.path.abspath(path)
    for root in _SHARED:
        if p == root or p.startswith(root + "/"):
            import sys
            raise RuntimeError(f"process {sys.modules['jax'].process_index()} tried to write {path}: only process 0 "
                               "writes the workdir (a missing writer check)")


def write_bytes(path: str, data: bytes) -> None:
    """Atomic for local files (write to a temp file, then rename), so a crash never leaves half a file."""
    _check_writer(path)
    if is_gcs(path):
        _blob(path).upload_from_string(data)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def listdir(path: str) -> list[str]:
    """Names directly under a folder (files and sub-folders), sorted."""
    if is_gcs(path):
        bucket, prefix = _split_gcs(path)
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        client = _client(os.environ.get("STORAGE_EMULATOR_HOST"))
        names = set()
        for blob in client.list_blobs(bucket, prefix=prefix):
            rel = blob.name[len(prefix):]
            if rel:
                names.add(rel.split("/", 1)[0])
        return sorted(names)
    if not os.path.isdir(path):
        return []
    return sorted(os.listdir(path))


def makedirs(path: str) -> None:
    _check_writer(path)
    if not is_gcs(path):  # gs:// has no folders
        os.makedirs(path, exist_ok=True)


def upload_file(local: str, remote: str) -> None:
    _check_writer(remote)
    if is_gcs(remote):
        _blob(remote).upload_from_filename(local)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(remote)), exist_ok=True)
        shutil.copyfile(local, remote)


def download_file(remote: str, local: str) -> None:
    if is_gcs(remote):
        from google.api_core import exceptions
        try:
            _blob(remote).download_to_filename(local)
        except exceptions.NotFound:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(local)
            raise FileNotFoundError(remote) from None
    else:
        shutil.copyfile(remote, local)


def copy_tree(src_dir: str, dst: str) -> None:
    """Copies a local folder to a local or gs:// destination, file by file."""
    for root, _, files in os.walk(src_dir):
        rel = os.path.relpath(root, src_dir)
        for name in files:
            target = join(dst, name) if rel == "." else join(dst, *rel.split(os.sep), name)
            upload_file(os.path.join(root, name), target)


@contextlib.contextmanager
def local_file(path: str) -> Iterator[str]:
    """A local path for reading `path`: itself if local, else a temporary download removed afterwards."""
    if not is_gcs(path):
        if not os.path.exists(path):
            raise FileNotFoundError(path)
        yield path
        return
    tmpdir = tempfile.mkdtemp(prefix="automem-gcs-")
    local = os.path.join(tmpdir, posixpath.basename(path))
    try:
        download_file(path, local)
        yield local
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


@contextlib.contextmanager
def local_dir_for_writing(path: str) -> Iterator[str]:
    """A local folder to write into; for gs:// it is uploaded when the block finishes without error."""
    _check_writer(path)
    if not is_gcs(path):
        os.makedirs(path, exist_ok=True)
        yield path
        return
    tmpdir = tempfile.mkdtemp(prefix="automem-upload-")
    try:
        yield tmpdir
        copy_tree(tmpdir, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def configure_tensorstore() -> None:
    """Point tensorstore (orbax's array I/O) at the same GCS endpoint as google-cloud-storage.

    Only matters with `STORAGE_EMULATOR_HOST` (tests, local emulators): tensorstore reads its own
    variables and would otherwise look for real credentials. Call before each orbax operation,
    since the emulator's address can change between runs in one process.
    """
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if host:
        os.environ["TENSORSTORE_GCS_HTTP_URL"] = host if host.startswith("http") else f"http://{host}"
        os.environ["GOOGLE_AUTH_TOKEN_FOR_TESTING"] = "emulator"


def primary_host() -> bool:
    """True on the host that writes shared files (jax process 0). Does not import jax: a process
    that never loaded it (an env worker, a trace tool) is a single host."""
    import sys
    jax = sys.modules.get("jax")
    return jax is None or jax.process_index() == 0
