"""Reading and writing hvcpolicy's own files: every read bounded, every write atomic.

A reader (the hook, ``status``, another host's ``check-migration``) sees the old file or the new
one, never a torn one, and after a crash the new one is on disk or not there at all: the data is
fsynced before the rename and the directory after it. Stdlib only and cheap to import: the hook
reads snapshots and policies through here.
"""

from __future__ import annotations

import os

from hvcpolicy.errors import InvalidInput

MAX_FILE = 1 << 20  # a policy, a host snapshot, a domain XML file: far below this


def read_bounded(path: str, limit: int = MAX_FILE) -> bytes:
    """The whole of ``path``, refused (InvalidInput, exit 4) past ``limit`` bytes."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as err:
        raise InvalidInput(f"cannot read: {err.strerror}", path) from None
    if len(data) > limit:
        raise InvalidInput(f"larger than {limit} bytes", path)
    return data


def read_prefix(path: str, limit: int = MAX_FILE) -> bytes | None:
    """At most ``limit + 1`` bytes of ``path`` (so a caller sees it is too large); None when it
    cannot be read."""
    try:
        with open(path, "rb") as fh:
            return fh.read(limit + 1)
    except OSError:
        return None


def write_atomic(path: str, data: str | bytes, mode: int, prefix: str = ".hvcpolicy-") -> None:
    """Replace ``path`` with ``data`` (text is UTF-8), file mode ``mode``, atomically and
    durably; the directory is created when missing."""
    import contextlib
    import tempfile

    raw = data.encode("utf-8") if isinstance(data, str) else data
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    """The rename itself, on disk (a filesystem that cannot fsync a directory: skipped)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # a filesystem that cannot fsync a directory
        pass
    finally:
        os.close(fd)
