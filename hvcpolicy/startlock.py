"""The start lock: how ``hvcpolicy start`` and the hook share one start of a domain.

While ``hvcpolicy start DOMAIN`` drives a start, it holds an exclusive ``flock`` on
``RUN_DIR/start/DOMAIN`` (``run_dir`` in the hook's config). The hook looks at it twice:

- ``prepare``: ``start`` has just run the same host check against the same snapshot and policy
  directory, so the sh pre-filter exits without starting Python (``started`` still enforces).
- ``started``: ``start`` serves the stage itself, from its warm interpreter, while libvirt's start
  job runs (the sh pre-filter asks by a line in ``RUN_DIR/call/DOMAIN``, a FIFO, and waits on the
  lock of ``RUN_DIR/answer/DOMAIN``, which ``start`` holds until it has answered there). The stage
  is the hook's own code (``hook.serve``), reading the hook's stdin; libvirt waits on the sh
  pre-filter's exit status exactly as on Python's. No answer to this very request (a fresh nonce
  from the kernel), and the sh pre-filter runs the hook's Python as always.
- ``started``, runstate ``prelaunch``: after writing and verifying, the stage hands what the guest
  now holds (and held before the write) to ``start`` through the lock file, instead of forking
  its recorder. ``start`` plans again from the same values, checks the read-back against that,
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
from hvcpolicy.trust import open_private, own_dir, private_dir

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import IO

    Handler = Callable[[IO[bytes]], tuple[int, str]]

SUBDIR = "start"
CALL_SUBDIR = "call"  # the FIFO the sh pre-filter asks on
ANSWER_SUBDIR = "answer"  # the answer, and the lock the sh pre-filter waits on
MAX_CALL = 256  # "NONCE PID\n": a UUID and a pid
MAX_HANDOVER = 256 << 10  # a rendered <hvc:policy> with every register, many times over


def lock_path(run_dir: str, name: str) -> str | None:
    """The lock of domain ``name``; None for a name that is not one plain file name (the sh
    pre-filter makes the same test)."""
    if not name or name.startswith(".") or "/" in name or "\0" in name:
        return None
    if len(name.encode("utf-8", "surrogateescape")) > 255:
        return None
    return os.path.join(run_dir, SUBDIR, name)


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

    __slots__ = ("fd", "name", "path", "server")

    def __init__(self, path: str, fd: int, name: str) -> None:
        self.path = path
        self.fd = fd
        self.name = name
        self.server: _Server | None = None

    @classmethod
    def acquire(cls, run_dir: str, name: str) -> StartLock | None:
        """Take the lock; None when there is no trusted place for it (a read-only or foreign
        ``run_dir``, a name that is no file name): ``start`` then works without it.
        Raises UsageError when another ``hvcpolicy start`` holds it."""
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

    def serve(self, handler: Handler) -> bool:
        """Answer the hook's ``started`` stage here, once: ``handler`` gets the hook's stdin and
        returns its exit status and message. False when there is no trusted place for the call
        and the answer: the hook then runs its own Python, as without ``start``."""
        run_dir = os.path.dirname(os.path.dirname(self.path))
        self.server = _Server.listen(run_dir, self.name, handler)
        return self.server is not None

    def release(self) -> None:
        """Stop serving, remove the files (when they are still ours) and drop the lock."""
        if self.server is not None:
            self.server.close()
        _unlink_if_ours(self.path, self.fd)
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
    if path is None or not private_dir(os.path.dirname(path)):
        return False
    fd = open_private(path, os.O_RDWR | os.O_NONBLOCK, stat.S_IFREG)
    if fd is None:
        return False
    import fcntl

    try:
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


def _unlink_if_ours(path: str, fd: int) -> None:
    try:
        mine = os.fstat(fd)
        there = os.lstat(path)
        if (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino):
            os.unlink(path)
    except OSError:
        pass


class _Server:
    """``start``'s side of the hook's ``started`` stage: one thread waits for the sh pre-filter's
    call, runs the stage, writes the answer and drops the answer lock the caller waits on.

    The call is ``NONCE PID``: the nonce comes back first in the answer, so no answer meant for
    another call (a start that died after answering) is ever taken; the PID is the hook's, whose
    stdin (``/proc/PID/fd/0``, libvirt's pipe) carries the domain XML. The FIFO is opened read
    and write, so the caller's write never blocks, with or without a reader."""

    __slots__ = ("answer", "answer_fd", "call", "call_fd", "done", "handler")

    def __init__(self, call: str, call_fd: int, answer: str, answer_fd: int, handler: Handler):
        self.call, self.call_fd = call, call_fd
        self.answer, self.answer_fd = answer, answer_fd
        self.handler = handler
        import _thread

        self.done = _thread.allocate_lock()  # held while the thread runs: close() waits on it
        self.done.acquire()
        _thread.start_new_thread(self._run, ())

    @classmethod
    def listen(cls, run_dir: str, name: str, handler: Handler) -> _Server | None:
        call = os.path.join(run_dir, CALL_SUBDIR, name)
        answer = os.path.join(run_dir, ANSWER_SUBDIR, name)
        if not (own_dir(os.path.dirname(call), 0o700) and own_dir(os.path.dirname(answer), 0o700)):
            return None
        import fcntl

        try:
            # both afresh: no answer an earlier start gave, nothing left unread in a FIFO
            for path in (call, answer):
                if os.path.lexists(path):
                    os.unlink(path)
            os.mkfifo(call, 0o600)
        except OSError:
            return None
        answer_fd = open_private(answer, os.O_RDWR | os.O_CREAT | os.O_EXCL, stat.S_IFREG)
        if answer_fd is None:
            return None
        fcntl.flock(answer_fd, fcntl.LOCK_EX)  # new: nobody else has it
        call_fd = open_private(call, os.O_RDWR, stat.S_IFIFO)
        if call_fd is None:
            os.close(answer_fd)
            return None
        return cls(call, call_fd, answer, answer_fd, handler)

    def _read_call(self) -> tuple[str, int] | None:
        data = b""
        while b"\n" not in data and len(data) <= MAX_CALL:
            chunk = os.read(self.call_fd, MAX_CALL)
            if not chunk:
                return None
            data += chunk
        words = data.split(b"\n", 1)[0].decode("ascii", "replace").split()
        if len(words) != 2 or not words[1].isdigit() or not _is_nonce(words[0]):
            return None  # "stop", or not a call: no answer, and a caller runs its own Python
        return words[0], int(words[1])

    def _run(self) -> None:
        import fcntl

        try:
            call = self._read_call()
            if call is not None:
                nonce, pid = call
                rc, message = self._stage(pid)
                answer = f"{nonce} {rc}\n" + (message + "\n" if message else "")
                os.ftruncate(self.answer_fd, 0)
                os.pwrite(self.answer_fd, answer.encode("utf-8", "backslashreplace"), 0)
        except Exception:  # no answer: the caller runs its own Python
            pass
        finally:
            fcntl.flock(self.answer_fd, fcntl.LOCK_UN)
            self.done.release()

    def _stage(self, pid: int) -> tuple[int, str]:
        # an error opening it: nothing read yet, no answer, and the caller runs the stage itself
        with open(f"/proc/{pid}/fd/0", "rb", buffering=0) as stdin:
            try:
                return self.handler(stdin)
            except Exception as err:  # the XML is consumed: refusing is all that is safe now
                return 1, f"hvcpolicy: internal error in `hvcpolicy start`: {err!r}"

    def close(self) -> None:
        """Stop the thread (a call that never came is not coming now), remove the files."""
        os.write(self.call_fd, b"stop\n")
        self.done.acquire()
        _unlink_if_ours(self.call, self.call_fd)
        _unlink_if_ours(self.answer, self.answer_fd)
        os.close(self.call_fd)
        os.close(self.answer_fd)


def _is_nonce(word: str) -> bool:
    """What the kernel's random/uuid gives: 36 characters of hex digits and dashes."""
    return len(word) == 36 and all(c in "0123456789abcdef-" for c in word)
