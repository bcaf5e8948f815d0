"""Run a daemon under a prompt reaper of orphans: ``python3 tests/libvirt/reaper.py CMD [ARG...]``.

libvirt daemonizes QEMU (a double fork), so QEMU's parent is whoever reaps orphans: PID 1, or the
nearest ancestor that made itself a "child subreaper" (prctl PR_SET_CHILD_SUBREAPER). When libvirt
stops a QEMU (``virsh save``, ``destroy``, ...) it sends SIGTERM and then polls ``kill(pid, 0)``
every 200 ms until the pid is gone. A zombie still answers ``kill(pid, 0)``, so the stop lasts
until the zombie is reaped. On a host, PID 1 (systemd) reaps at once. In some sandboxes, PID 1
reaps only every 2 s (measured: docs/PERFORMANCE.md), and every save waits up to 2 s for it. That
wait belongs to the sandbox, not to libvirt or hvcpolicy, so the benchmark and the libvirt tests
start their libvirtd under this reaper, as a host's init would.

The reaper forks into its own session, makes itself a subreaper, runs CMD (``libvirtd -d``
daemonizes and is then reparented to the reaper, and so is every QEMU it starts), and exits in the
foreground with CMD's exit status. In the background it reaps every child as soon as it exits and
quits when it has none left (the daemon was stopped and its QEMUs have exited).
"""

from __future__ import annotations

import ctypes
import os
import sys

PR_SET_CHILD_SUBREAPER = 36


def _subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def _reap_forever(cmd_pid: int, report: int) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return  # nothing left: the daemon and all it spawned have exited
        except InterruptedError:
            continue
        if pid == cmd_pid and report >= 0:
            os.write(report, str(os.waitstatus_to_exitcode(status)).encode())
            os.close(report)
            report = -1


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: reaper.py CMD [ARG...]", file=sys.stderr)
        return 2
    r, w = os.pipe()
    if os.fork() == 0:  # the reaper
        os.close(r)
        try:
            os.setsid()
            _subreaper()
            fd = os.open(os.devnull, os.O_RDWR)
            os.dup2(fd, 0)
            pid = os.fork()
            if pid == 0:
                os.close(w)
                os.execvp(argv[0], argv)
            # the reaper's own stdout/stderr would hold the caller's pipes open
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            _reap_forever(pid, w)
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 16):
        data += chunk
    return int(data) if data else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
