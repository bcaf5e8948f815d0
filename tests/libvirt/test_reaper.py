"""tests/libvirt/reaper.py: the daemon's orphans are reaped at once, not at PID 1's leisure (in
this sandbox PID 1 reaps every 2 s, and libvirt's every QEMU stop waited for it)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tests.libvirt.conftest import REAPER, run

# a "daemon": forks a grandchild that outlives it by about 1 s (as libvirtd -d and QEMU do), exits 3
DAEMON = """
import os, sys, time
if os.fork() == 0:
    if os.fork() == 0:
        null = os.open(os.devnull, os.O_RDWR)  # a daemon lets go of its caller's pipes
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        open(sys.argv[1], "w").write(str(os.getpid()))
        time.sleep(1)
        os._exit(0)
    os._exit(0)
os.wait()
time.sleep(0.1)
sys.exit(3)
"""


def _stat(pid: int) -> tuple[str, int] | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None
    return fields[0], int(fields[1])


def test_orphans_are_reaped_promptly_and_the_exit_status_is_the_commands(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    done = run([*REAPER, sys.executable, "-c", DAEMON, str(pidfile)], check=False, timeout=30)
    assert done.returncode == 3, done.stderr
    pid = int(pidfile.read_text())
    stat = _stat(pid)
    assert stat is not None and stat[1] != 1, f"the orphan's parent is {stat}, not the reaper"
    reaper = stat[1]
    died = None
    deadline = time.monotonic() + 10
    while (stat := _stat(pid)) is not None:
        if stat[0] == "Z" and died is None:
            died = time.monotonic()
        assert time.monotonic() < deadline, "the orphan was not reaped in 10 s"
        time.sleep(0.001)
    assert died is None or time.monotonic() - died < 0.1, "the zombie lived >= 100 ms"
    deadline = time.monotonic() + 5  # with nothing left to reap, the reaper exits
    while (rstat := _stat(reaper)) is not None and rstat[0] != "Z":
        assert time.monotonic() < deadline, "the reaper outlived its last child"
        time.sleep(0.01)
