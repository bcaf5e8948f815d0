"""The start lock: how ``hvcpolicy start`` and the hook share one start of a domain.

While ``hvcpolicy start DOMAIN`` drives a start, it holds an exclusive ``flock`` on
``RUN_DIR/start/DOMAIN`` (``run_dir`` in the hook's config). The hook looks at it twice:

- ``prepare``: ``start`` has just run the same host check against the same snapshot and policy
  directory, so the sh pre-filter exits without starting Python (``started`` still enforces).
- ``started``, runstate ``prelaunch``: after writing and verifying, the hook hands what the guest
  now holds (and held before the write) to ``start`` through the file, instead of forking its
  recorder. ``start`` plans again from the same values, checks the hook's read-back against that,
  records ``<hvc:applied>`` and resumes, with no ``virsh`` racing its calls.

A lock that nobody holds (its ``start`` is gone: the lock died with it) is ignored, so is a file or
directory that this user does not own or that others can write: the hook then does what it does
without ``start``. Failing that way is always safe: the prepare check runs, the recorder records.
"""

from __future__ import annotations

import os
import stat

from hvcpolicy.errors import InvalidInput, UsageError
from hvcpolicy.record import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

SUBDIR = "start"
MAX_HANDOVER = 256 << 10  # a rendered <hvc:policy> with every register, many times over


def lock_path(run_dir: str, name: str) -> str | None:
    """The lock of domain ``name``; None for a name that is not one plain file name (the sh
    pre-filter makes the same test)."""
    if not name or name.startswith(".") or "/" in name or "\0" in name:
        return None
    if len(name.encode("utf-8", "surrogateescape")) > 255:
        return None
    return os.path.join(run_dir, SUBDIR, name)


def _trusted(st: os.stat_result) -> bool:
    return st.st_uid == os.geteuid() and not st.st_mode & 0o022


def _trusted_dir(path: str) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and _trusted(st)


class HandOver(Record):
    """What the hook's ``started`` stage gives ``start``: the guest's registers before its write
    and on every vCPU after it, and the ``<hvc:policy>`` element that records them."""

    __slots__ = ("after", "before", "element")

    def __init__(self, before: dict[int, int], after: dict[int, int], element: str) -> None:
        self.before = before
        self.after = after
        self.element = element


def _registers(doc: object, field: str, where: str) -> dict[int, int]:
    if not isinstance(doc, dict):
        raise InvalidInput(f"{field}: expected an object of register id -> value", where)
    out: dict[int, int] = {}
    for key, value in doc.items():
        if not key.isdigit() or type(value) is not int or value < 0:
            raise InvalidInput(f"{field}: {key!r}: expected a register id and a value", where)
        out[int(key)] = value
    return out


class StartLock:
    """Held by ``hvcpolicy start`` from before its paused start until the guest is resumed."""

    __slots__ = ("fd", "name", "path")

    def __init__(self, path: str, fd: int, name: str) -> None:
        self.path = path
        self.fd = fd
        self.name = name

    @classmethod
    def acquire(cls, run_dir: str, name: str) -> StartLock | None:
        """Take the lock; None when there is no trusted place for it (a read-only or foreign
        ``run_dir``, a name that is no file name): ``start`` then works without it.
        Raises UsageError when another ``hvcpolicy start`` holds it."""
        path = lock_path(run_dir, name)
        if path is None:
            return None
        directory = os.path.dirname(path)
        try:
            os.makedirs(run_dir, 0o755, exist_ok=True)
            os.makedirs(directory, 0o700, exist_ok=True)
        except OSError:
            return None
        if not (_trusted_dir(run_dir) and _trusted_dir(directory)):
            return None
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError:
            return None
        import fcntl

        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or not _trusted(st):
                os.close(fd)
                return None
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(
                f"domain {name!r} is being started by another `hvcpolicy start` ({path})"
            ) from None
        os.ftruncate(fd, 0)  # whatever a start before this one was handed
        return cls(path, fd, name)

    def handed_over(self) -> HandOver | None:
        """What the hook read, wrote and verified, and the ``<hvc:policy>`` element recording it;
        None when no hook handed anything over (no hook installed, or one without the lock)."""
        data = os.pread(self.fd, MAX_HANDOVER + 1, 0)
        if not data:
            return None
        where = f"{self.path} (the hook's hand-over)"
        if len(data) > MAX_HANDOVER:
            raise InvalidInput(f"larger than {MAX_HANDOVER} bytes", where)
        from hvcpolicy.lean import json_loads

        try:
            doc = json_loads(data.decode("utf-8"))
        except ValueError as err:
            raise InvalidInput(f"not JSON: {err}", where) from None
        if not isinstance(doc, dict) or not isinstance(doc.get("element"), str):
            raise InvalidInput("expected an object with 'before', 'after' and 'element'", where)
        return HandOver(
            _registers(doc.get("before"), "before", where),
            _registers(doc.get("after"), "after", where),
            doc["element"],
        )

    def release(self) -> None:
        """Remove the file (when it is still ours) and drop the lock."""
        try:
            mine = os.fstat(self.fd)
            there = os.lstat(self.path)
            if (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino):
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)

    def __enter__(self) -> StartLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def hand_over(
    run_dir: str, name: str, before: Mapping[int, int], after: Mapping[int, int], element: str
) -> bool:
    """The hook's side, in ``started``/``prelaunch``: give ``start`` what the guest held before
    the write and holds now.
    True: a live ``start`` holds the lock and has it; False: nobody to hand to."""
    path = lock_path(run_dir, name)
    if path is None or not _trusted_dir(os.path.dirname(path)):
        return False
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    import fcntl

    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not _trusted(st):
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # held: its start is alive and waiting for the hand-over
        else:
            return False  # nobody holds it: a start that is gone
        from hvcpolicy.lean import json_dumps

        doc = {
            "before": {str(k): v for k, v in before.items()},
            "after": {str(k): v for k, v in after.items()},
            "element": element,
        }
        payload = json_dumps(doc).encode("utf-8")
        os.ftruncate(fd, 0)
        os.pwrite(fd, payload, 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
