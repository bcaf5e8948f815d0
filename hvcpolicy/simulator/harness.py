"""Start a simulator for tests: in-process (fast) or as a real ``hvcpolicy simulate`` process.

Both wait, bounded, until the socket accepts connections, and both clean up after themselves
(a process is stopped by its own pid: SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence

from hvcpolicy.simulator.faults import Faults
from hvcpolicy.simulator.profiles import profile_for
from hvcpolicy.simulator.server import QMPServer, SimBackend
from hvcpolicy.simulator.vm import SimVM


@contextlib.asynccontextmanager
async def simulator(
    socket_path: str,
    kernel: str = "6.18",
    vcpus: int = 1,
    runstate: str = "prelaunch",
    faults: Sequence[str] = (),
    psci_0_2: bool = True,
    protected: bool = False,
    has_run: bool | None = None,
) -> AsyncIterator[QMPServer]:
    """A simulator serving ``socket_path`` in this event loop; ``.vm`` is its SimVM."""
    parsed = Faults.parse(list(faults))
    vm = SimVM(profile_for(kernel), vcpus, psci_0_2=psci_0_2, protected=protected)
    server = QMPServer(SimBackend(vm, runstate, parsed, has_run), parsed)
    await server.start(socket_path)
    try:
        yield server
    finally:
        await server.close()


def _identity(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_ctime_ns  # inode numbers get reused


def wait_for_socket(
    path: str,
    proc: subprocess.Popen[bytes] | None,
    timeout: float,
    stale: tuple[int, int, int] | None = None,
) -> None:
    """Until ``path`` exists (and is not the file ``stale`` identified before the start)."""
    deadline = time.monotonic() + timeout
    while True:
        ident = _identity(path)
        if ident is not None and ident != stale:
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"simulator exited with {proc.returncode} before listening")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> int:
    """SIGTERM, then SIGKILL; the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    return proc.returncode


@contextlib.contextmanager
def simulator_process(
    socket_path: str,
    kernel: str = "6.18",
    *args: str,
    timeout: float = 15.0,
    standalone: bool = False,
) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m hvcpolicy simulate --socket PATH --kernel KERNEL ARGS...``, listening.

    ``standalone``: run ``python -m hvcpolicy.simulator`` instead, which loads no other command.
    """
    entry = ["hvcpolicy.simulator"] if standalone else ["hvcpolicy", "simulate"]
    cmd = [sys.executable, "-m", *entry, "--socket", socket_path]
    cmd += ["--kernel", kernel, *args]
    stale = _identity(socket_path)
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        wait_for_socket(socket_path, proc, timeout, stale)
        yield proc
    finally:
        stop_process(proc)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


async def wait_for_socket_async(path: str, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not os.path.exists(path):
            await asyncio.sleep(0.02)
