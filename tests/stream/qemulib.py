"""A real QEMU (qemu-system-aarch64, TCG) for the stream tests: start a never-run guest, save it
to a file with QMP ``migrate`` (``exec:cat > FILE``), load a file into a fresh QEMU
(``-incoming defer`` + ``migrate-incoming``). Every wait is bounded; every QEMU is ours and stopped
by its Popen handle."""

from __future__ import annotations

import contextlib
import shlex
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

QEMU = "qemu-system-aarch64"
TIMEOUT = 60.0


class QMP:
    """The test's end of QEMU's monitor: hvcpolicy's one QMP client (qemu.qmp inside)."""

    def __init__(self, path: str, proc: subprocess.Popen[bytes]) -> None:
        from hvcpolicy.qmp import QMP as Client

        self.client = Client(path, TIMEOUT)  # connect() retries until QEMU listens
        try:
            self.client.connect()
        except Exception:
            if proc.poll() is not None:
                raise AssertionError(f"QEMU exited ({proc.returncode}) before its QMP") from None
            raise

    def cmd(self, name: str, **arguments: Any) -> Any:
        from hvcpolicy.errors import QMPError

        try:
            return self.client.command(name, arguments or None)
        except QMPError as err:
            raise RuntimeError(f"{name}: {err}") from None

    def close(self) -> None:
        self.client.close()

    def wait_migration(self) -> dict[str, Any]:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            info: dict[str, Any] = self.cmd("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                return info
            time.sleep(0.02)
        raise AssertionError("migration did not finish")


class Guest:
    """One QEMU process with its QMP connection."""

    def __init__(self, proc: subprocess.Popen[bytes], qmp: QMP | None, err: Path) -> None:
        self.proc = proc
        self.qmp = qmp
        self.err = err

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def save(self, path: Path) -> dict[str, Any]:
        assert self.qmp is not None
        self.qmp.cmd("migrate", uri=f"exec:cat > {shlex.quote(str(path))}")
        return self.qmp.wait_migration()


@contextlib.contextmanager
def qemu(
    smp: int = 2, mem: str = "128", incoming: bool = False, cpu: str = "max"
) -> Iterator[Guest]:
    with tempfile.TemporaryDirectory(prefix="hvct-qemu-") as tmp:
        sock = f"{tmp}/qmp.sock"
        err = Path(tmp) / "stderr"
        cmd = [
            QEMU,
            "-machine", "virt",
            "-cpu", cpu,
            "-smp", str(smp),
            "-m", mem,
            "-nodefaults",
            "-display", "none",
            "-S",
            "-qmp", f"unix:{sock},server=on,wait=off",
        ]  # fmt: skip
        if incoming:
            cmd += ["-incoming", "defer"]
        with err.open("wb") as errf:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errf
            )
        try:
            guest = Guest(proc, None, err)
            guest.qmp = QMP(sock, proc)
            yield guest
        finally:
            if proc.poll() is None:
                with contextlib.suppress(Exception):
                    if guest.qmp is not None:
                        guest.qmp.cmd("quit")
            if guest.qmp is not None:
                with contextlib.suppress(Exception):
                    guest.qmp.close()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)


def save_stream(path: Path, smp: int = 2, mem: str = "128") -> Path:
    """A never-run guest's stream, saved by a real QEMU."""
    with qemu(smp, mem) as g:
        info = g.save(path)
        assert info["status"] == "completed", info
    return path


def load_stream(path: Path, smp: int = 2, mem: str = "128", resave: Path | None = None) -> str:
    """Load ``path`` into a fresh QEMU: "" when QEMU accepted it (and, with ``resave``, saved the
    loaded guest there), else what went wrong."""
    with qemu(smp, mem, incoming=True) as g:
        assert g.qmp is not None
        try:
            g.qmp.cmd("migrate-incoming", uri=f"exec:cat {shlex.quote(str(path))}")
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline:
                if g.proc.poll() is not None:
                    return f"QEMU exited {g.proc.returncode}: {g.stderr().strip()}"
                status = g.qmp.cmd("query-status")["status"]
                if status != "inmigrate":
                    break
                time.sleep(0.02)
            else:
                return "the load did not finish"
        except (RuntimeError, OSError, AssertionError) as err:
            return f"{err}: {g.stderr().strip()}"
        if status not in ("prelaunch", "paused"):
            return f"runstate {status}: {g.stderr().strip()}"
        if resave is not None:
            info = g.save(resave)
            if info["status"] != "completed":
                return f"re-save: {info}"
        return ""
