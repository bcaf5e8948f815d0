"""Simulated QEMUs served from a background event loop, so a test can run ``hvcpolicy apply`` or
the hook as a real process against them and then look inside: the runstate, whether a vCPU ever
ran, and the register values as the simulated kernel holds them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hvcpolicy.simulator.faults import Faults
from hvcpolicy.simulator.profiles import profile_for
from hvcpolicy.simulator.server import QMPServer, SimBackend
from hvcpolicy.simulator.vm import SimVM

REPO = Path(__file__).resolve().parents[2]


class Loop:
    """One asyncio loop in a daemon thread, shared by every simulator of a test."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 10.0) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()


@dataclass
class Sim:
    path: str
    server: QMPServer
    backend: SimBackend
    fresh: dict[int, int]

    @property
    def vm(self) -> SimVM:
        return self.backend.vm

    @property
    def status(self) -> str:
        return self.backend.status

    @property
    def has_run(self) -> bool:
        return self.backend.vm.has_run


@contextlib.contextmanager
def simulators(
    count: int = 1,
    kernel: str = "6.18",
    vcpus: int = 1,
    runstate: str = "prelaunch",
    faults: Sequence[str] = (),
) -> Iterator[list[Sim]]:
    """``count`` simulated QEMUs (each with its own faults state), sockets in a short tmp dir."""
    loop = Loop()
    sockdir = tempfile.mkdtemp(prefix="hvh-", dir="/tmp")
    os.chmod(sockdir, 0o700)
    sims: list[Sim] = []
    try:
        for i in range(count):
            parsed = Faults.parse(list(faults))
            vm = SimVM(profile_for(kernel), vcpus)
            backend = SimBackend(vm, runstate, parsed)
            server = QMPServer(backend, parsed)
            path = os.path.join(sockdir, f"d{i}.qmp")
            loop.run(server.start(path))
            sims.append(Sim(path, server, backend, vm.get_all()))
        yield sims
    finally:
        for sim in sims:
            with contextlib.suppress(Exception):
                loop.run(sim.server.close(), timeout=5)
        loop.close()
        shutil.rmtree(sockdir, ignore_errors=True)


@dataclass
class Run:
    rc: int
    stdout: str
    stderr: str
    seconds: float


def hvcpolicy(
    *args: str, stdin: bytes = b"", timeout: float = 60, env: dict[str, str] | None = None
) -> Run:
    """``python -m hvcpolicy ARGS`` as a real process, bounded by ``timeout``."""
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "hvcpolicy", *args],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
        check=False,
    )
    return Run(
        done.returncode,
        done.stdout.decode("utf-8", "replace"),
        done.stderr.decode("utf-8", "replace"),
        time.monotonic() - start,
    )


HOOK_ENTRY = (  # this checkout's package, whatever else is installed
    f"import sys; sys.path.insert(0, {str(REPO)!r}); "
    "from hvcpolicy.hook import config, entry; config.SYSTEM_CONF = sys.argv[1]; "
    "sys.exit(entry.main(sys.argv[2:], sys.stdin.buffer))"
)


def hook_cmd(conf: str, *argv: str) -> list[str]:
    """The hook's own entry (hvcpolicy.hook.entry.main) with its config file pointed at ``conf``:
    as root the hook reads /etc/hvcpolicy/hook.conf, which a test must not touch."""
    return [sys.executable, "-c", HOOK_ENTRY, conf, *argv]


def run_hook(conf: str, argv: Sequence[str], xml: bytes, timeout: float = 60) -> Run:
    start = time.monotonic()
    done = subprocess.run(
        hook_cmd(conf, *argv),
        input=xml,
        capture_output=True,
        timeout=timeout,
        cwd="/",
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "HOME": "/root"},
        check=False,
    )
    return Run(
        done.returncode,
        done.stdout.decode("utf-8", "replace"),
        done.stderr.decode("utf-8", "replace"),
        time.monotonic() - start,
    )
