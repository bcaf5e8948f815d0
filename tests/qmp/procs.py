"""Processes the QMP and apply tests start: real QEMU, ``hvcpolicy simulate``, ``hvcpolicy``.

Every process is stopped by its own pid (SIGTERM, then SIGKILL); every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from hvcpolicy.firmware import Registers
from hvcpolicy.qmp import QMP

REPO = Path(__file__).resolve().parents[2]
QEMU = shutil.which("qemu-system-aarch64") or "qemu-system-aarch64"
START_TIMEOUT = 15.0


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _wait_socket(path: Path, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not path.exists():
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"{what} exited with {proc.returncode}: {err.strip()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: {path} did not appear within {START_TIMEOUT} s")
        time.sleep(0.01)


class Qemu:
    """A real ``qemu-system-aarch64 -machine virt -cpu max -accel tcg -S`` with two QMP
    monitors: ``sock`` for the code under test, ``mon`` for the test's own checks."""

    def __init__(self, sock: Path, mon: Path, proc: subprocess.Popen[bytes]) -> None:
        self.sock = sock
        self.mon = mon
        self.proc = proc


@contextlib.contextmanager
def qemu(
    tmp: Path, smp: int = 1, incoming: bool = False, extra: Sequence[str] = ()
) -> Iterator[Qemu]:
    sock, mon = tmp / "qemu.qmp", tmp / "qemu-mon.qmp"
    cmd = [QEMU, "-machine", "virt", "-cpu", "max", "-accel", "tcg", "-S"]
    cmd += ["-display", "none", "-nodefaults", "-no-user-config", "-m", "64"]
    cmd += ["-smp", str(smp)]
    cmd += ["-qmp", f"unix:{mon},server=on,wait=off", "-qmp", f"unix:{sock},server=on,wait=off"]
    if incoming:
        cmd += ["-incoming", "defer"]
    cmd += list(extra)
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        _wait_socket(sock, proc, "qemu-system-aarch64")
        yield Qemu(sock, mon, proc)
    finally:
        _stop(proc)
        if proc.stderr is not None:
            proc.stderr.close()


@contextlib.contextmanager
def simulator(sock: Path, kernel: str, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m hvcpolicy simulate --socket SOCK --kernel KERNEL ARGS...``, listening."""
    cmd = [sys.executable, "-m", "hvcpolicy", "simulate", "--socket", str(sock)]
    cmd += ["--kernel", kernel, *args]
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    try:
        _wait_socket(sock, proc, "hvcpolicy simulate")
        yield proc
    finally:
        _stop(proc)
        if proc.stderr is not None:
            proc.stderr.close()


class Run:
    def __init__(self, rc: int, out: str, err: str, elapsed: float) -> None:
        self.rc = rc
        self.out = out
        self.err = err
        self.elapsed = elapsed

    def json(self) -> dict[str, object]:
        doc = json.loads(self.out)
        assert isinstance(doc, dict)
        return doc

    def __repr__(self) -> str:
        return f"Run(rc={self.rc}, {self.elapsed:.2f} s, err={self.err!r}, out={self.out[:400]!r})"


def hvcpolicy(*args: str, stdin: str | None = None, limit: float = 60.0) -> Run:
    """Run the CLI as a real process; ``limit`` only guards the test run itself."""
    env = dict(os.environ)
    env.pop("HVCPOLICY_POLICY_DIR", None)
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "hvcpolicy", *args],
        input=stdin.encode() if stdin is not None else None,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        timeout=limit,
        cwd=REPO,
        env=env,
    )
    return Run(
        proc.returncode,
        proc.stdout.decode(errors="replace"),
        proc.stderr.decode(errors="replace"),
        time.monotonic() - start,
    )


# --- the test's own QMP look at a guest -------------------------------------------------------


def qmp_commands(sock: Path, *commands: tuple[str, Mapping[str, object] | None]) -> list[object]:
    with QMP(str(sock), 5.0) as qmp:
        return [qmp.command(name, args) for name, args in commands]


def runstate(sock: Path) -> str:
    (reply,) = qmp_commands(sock, ("query-status", None))
    assert isinstance(reply, dict)
    status = reply["status"]
    assert isinstance(status, str)
    return status


def registers(sock: Path) -> list[Registers]:
    """The firmware registers as every vCPU reads them."""
    with QMP(str(sock), 5.0) as qmp:
        return qmp.read()


def hexregs(values: Mapping[int, int]) -> dict[str, str]:
    return {f"0x{r:016x}": f"0x{v:x}" for r, v in values.items()}
