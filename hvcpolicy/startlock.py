"""The start lock: how ``hvcpolicy start`` (or the hook's detached child) and the hook share one
start of a domain.

While ``hvcpolicy start DOMAIN`` drives a start, it holds an exclusive ``flock`` on
``RUN_DIR/start/DOMAIN`` (``run_dir`` in the hook's config), and the file's first line says what
it is doing with libvirt right now (the *phase*):

- ``start``: its own paused start. It has run the host check of ``prepare`` itself, and it
  enforces, records and resumes itself: the hook's ``prepare`` and ``started`` step aside.
- ``restore``: the stream backend's restore of the never-run guest it saved (SPEC §8). libvirt
  runs ``restore``, ``prepare``, ``start`` and ``started`` (in ``prelaunch``) again; they are
  hvcpolicy's own cycle, not a new start: they step aside too.
- ``busy``: anything else (reading, planning, the save, the read-back). A start by someone else
  in between (say, after the save and before the restore) gets the whole hook.

The sh pre-filter (``hooks/qemu``) makes this test with ``flock -n`` and ``read``, without
starting Python; the hook's Python makes it again (:func:`driving`) for when it runs anyway. A
lock nobody holds (its start is gone: the lock died with it) or a file this user does not own or
others can write is ignored: the hook then does everything itself, which is always safe.
"""

from __future__ import annotations

import os
import stat

from hvcpolicy.errors import UsageError
from hvcpolicy.trust import open_private, own_dir, private_dir

SUBDIR = "start"
START, RESTORE, BUSY = "start", "restore", "busy"
PHASES = (START, RESTORE, BUSY)
# the stages that step aside in each phase (the sh pre-filter has the same table)
STEPS_ASIDE = {START: ("prepare", "started"), RESTORE: ("restore", "prepare", "started")}


def lock_path(run_dir: str, name: str) -> str | None:
    """The lock of domain ``name``; None for a name that is not one plain file name (the sh
    pre-filter makes the same test)."""
    if not name or name.startswith(".") or "/" in name or "\0" in name:
        return None
    if len(name.encode("utf-8", "surrogateescape")) > 255:
        return None
    return os.path.join(run_dir, SUBDIR, name)


class StartLock:
    """Held from before a paused start until the guest is resumed (or left for good)."""

    __slots__ = ("fd", "name", "path")

    def __init__(self, path: str, fd: int, name: str) -> None:
        self.path = path
        self.fd = fd
        self.name = name

    @classmethod
    def acquire(cls, run_dir: str, name: str, phase: str = BUSY) -> StartLock | None:
        """Take the lock; None when there is no trusted place for it (a read-only or foreign
        ``run_dir``, a name that is no file name): the start then works without it, and the
        hook does everything itself. Raises UsageError when another start holds it."""
        path = lock_path(run_dir, name)
        if path is None:
            return None
        if not (own_dir(run_dir, 0o755) and own_dir(os.path.dirname(path), 0o700)):
            return None
        fd = open_private(path, os.O_RDWR | os.O_CREAT, stat.S_IFREG)
        if fd is None:
            return None
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(
                f"domain {name!r} is being started by another `hvcpolicy start` ({path})"
            ) from None
        lock = cls(path, fd, name)
        lock.phase(phase)
        return lock

    def phase(self, phase: str) -> None:
        """Say what this start does now (one of :data:`PHASES`), before doing it."""
        assert phase in PHASES
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{phase}\n".encode("ascii"), 0)

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


def driving(run_dir: str, name: str) -> str | None:
    """The phase of a live start of domain ``name`` (its lock is held), else None: the hook's
    side of the test the sh pre-filter makes."""
    path = lock_path(run_dir, name)
    if path is None or not private_dir(os.path.dirname(path)):
        return None
    fd = open_private(path, os.O_RDONLY | os.O_NONBLOCK, stat.S_IFREG)
    if fd is None:
        return None
    import fcntl

    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held: its start is alive
            word = os.pread(fd, 16, 0).split(b"\n", 1)[0].decode("ascii", "replace")
            return word if word in PHASES else None
        return None  # nobody holds it: a start that is gone
    except OSError:
        return None
    finally:
        os.close(fd)


def steps_aside(run_dir: str, name: str, stage: str) -> bool:
    """Whether the hook's ``stage`` is part of a start that ``hvcpolicy start`` (or the hook's
    child) drives right now, and has nothing to do."""
    phase = driving(run_dir, name)
    return phase is not None and stage in STEPS_ASIDE.get(phase, ())
