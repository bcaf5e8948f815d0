"""``hvcpolicy simulate`` as a real process: readiness, exit paths, exit codes, socket handling."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from hvcpolicy.simulator.harness import simulator_process, stop_process, wait_for_socket
from tests.simulator.conftest import RawQMP, arun

CPU0 = "/machine/unattached/device[0]"
PROP = "kvm-firmware-registers"


def run_cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hvcpolicy", "simulate", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["--kernel", "6.1"], 2),  # no --socket
        (["--socket", "S", "--kernel", "6.1", "--vcpus", "0"], 2),
        (["--socket", "S", "--kernel", "6.1", "--vcpus", "two"], 2),
        (["--socket", "S", "--kernel", "6.1", "--runstate", "warp"], 2),
        (["--socket", "S", "--kernel", "6.1", "--upstream", "U", "--vcpus", "2"], 2),
        (["--socket", "S", "--kernel", "3.10"], 4),
        (["--socket", "S", "--kernel", "linux"], 4),
        (["--socket", "S", "--kernel", "6.1", "--fault", "warp-drive"], 4),
        (["--socket", "S", "--kernel", "6.1", "--fault", "slow"], 4),
        (["--socket", "S", "--kernel", "6.1", "--wa-levels", "2,0"], 4),
        (["--socket", "S", "--kernel", "6.1", "--wa-levels", "3,0,1"], 4),
    ],
)
def test_bad_arguments(args: list[str], code: int, sock: str) -> None:
    args = [sock if a == "S" else a for a in args]
    result = run_cli(*args)
    assert result.returncode == code, result.stderr
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("hvcpolicy: ")
    assert "Traceback" not in result.stderr
    assert not os.path.exists(sock)


def test_not_a_socket_is_left_alone(sock: str) -> None:
    with open(sock, "w") as f:
        f.write("precious")
    result = run_cli("--socket", sock, "--kernel", "6.1")
    assert result.returncode == 4
    assert "not a socket" in result.stderr
    with open(sock) as f:
        assert f.read() == "precious"


def test_unreachable_upstream_is_exit_5(sock: str) -> None:
    result = run_cli("--socket", sock, "--kernel", "6.1", "--upstream", sock + ".nothing")
    assert result.returncode == 5, result.stderr
    assert "--upstream" in result.stderr and result.stderr.count("\n") == 1
    assert not os.path.exists(sock)


def test_ready_when_the_socket_appears_and_sigterm_exits_cleanly(sock: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "hvcpolicy", "simulate", "--socket", sock, "--kernel", "6.18"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_socket(sock, proc, 15)
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(3)
        s.connect(sock)  # never ECONNREFUSED: the path appears only once listening
        assert s.recv(4096).startswith(b'{"QMP": ')
        s.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        out, err = proc.communicate(timeout=5)
        assert out == b"" and err == b""
        assert not os.path.exists(sock)
    finally:
        stop_process(proc)


def test_sigint_exits_cleanly(sock: str) -> None:
    with simulator_process(sock, "6.1") as proc:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
        assert not os.path.exists(sock)


def test_quit_exits_and_stale_socket_is_replaced(sock: str) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(sock)
    stale.close()  # a socket file nobody listens on
    with simulator_process(sock, "5.10", "--vcpus", "2", "--runstate", "paused") as proc:

        async def body() -> None:
            c = await RawQMP.open(sock)
            assert (await c.ok("query-status"))["status"] == "paused"
            assert len(await c.ok("query-cpus-fast")) == 2
            regs = await c.ok("qom-get", {"path": CPU0, "property": PROP})
            assert sorted(regs) == [f"0x603000000014000{i}" for i in range(4)]
            await c.send({"execute": "quit", "id": 1})
            assert (await c.reply())["id"] == 1
            assert [e["event"] for e in c.events] == ["SHUTDOWN"]
            assert await c.eof()

        arun(body())
        assert proc.wait(10) == 0
        assert not os.path.exists(sock)


def test_a_live_socket_is_not_stolen(sock: str) -> None:
    with simulator_process(sock, "6.1") as first:
        result = run_cli("--socket", sock, "--kernel", "6.1")
        assert result.returncode == 5
        assert "listening" in result.stderr
        assert first.poll() is None

        async def body() -> None:
            c = await RawQMP.open(sock)
            assert (await c.ok("query-status"))["status"] == "prelaunch"
            await c.close()

        arun(body())


def test_options_reach_the_vm(sock: str) -> None:
    args = ("--no-psci-0-2", "--wa-levels", "1,3,2", "--fault", "slow@query-kvm=0.01")
    with simulator_process(sock, "6.18.30-61.116.amzn2023.aarch64", *args):

        async def body() -> None:
            c = await RawQMP.open(sock)
            regs = await c.ok("qom-get", {"path": CPU0, "property": PROP})
            assert regs["0x6030000000140000"] == 0x1
            assert [regs[f"0x603000000014000{i}"] for i in (1, 2, 3)] == [1, 3, 2]
            await c.close()

        arun(body())


def test_exit_fault_ends_the_process_and_leaves_the_socket(sock: str) -> None:
    with simulator_process(sock, "6.18", "--fault", "exit@qom-set") as proc:

        async def body() -> None:
            c = await RawQMP.open(sock)
            await c.send(
                {
                    "execute": "qom-set",
                    "arguments": {"path": CPU0, "property": PROP, "value": {}},
                }
            )
            assert await c.eof()

        arun(body())
        t0 = time.monotonic()
        assert proc.wait(10) == 0
        assert time.monotonic() - t0 < 10
        assert os.path.exists(sock)
        with pytest.raises(ConnectionRefusedError):
            asyncio.run(asyncio.wait_for(asyncio.open_unix_connection(sock), 3))


def test_help_lists_every_fault() -> None:
    from hvcpolicy.simulator.faults import KINDS

    result = run_cli("--help")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    for name in KINDS:
        assert any(line.startswith(f"  {name}: ") for line in lines), name


def test_standalone_entry_point(sock: str) -> None:
    with simulator_process(sock, "6.1", "--vcpus", "2", standalone=True) as proc:

        async def body() -> None:
            c = await RawQMP.open(sock)
            assert len(await c.ok("query-cpus-fast")) == 2
            await c.ok("quit")

        arun(body())
        assert proc.wait(10) == 0
    bad = subprocess.run(
        [sys.executable, "-m", "hvcpolicy.simulator", "--socket", sock, "--kernel", "2.6"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert bad.returncode == 4 and bad.stderr.count("\n") == 1


def test_sigterm_while_the_upstream_never_greets(sock: str) -> None:
    mute = socket.socket(socket.AF_UNIX)
    mute.bind(sock + ".mute")
    mute.listen(1)  # accepts (in the backlog), never greets
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hvcpolicy",
                "simulate",
                "--socket",
                sock,
                "--kernel",
                "6.18",
                "--upstream",
                sock + ".mute",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            time.sleep(1.0)  # started, waiting for the greeting (bounded at 5 s)
            assert proc.poll() is None
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0
            assert time.monotonic() - t0 < 3
            assert proc.communicate(timeout=5) == (b"", b"")
            assert not os.path.exists(sock)
        finally:
            stop_process(proc)
    finally:
        mute.close()


def test_upstream_that_never_greets_is_exit_5(sock: str) -> None:
    mute = socket.socket(socket.AF_UNIX)
    mute.bind(sock + ".mute")
    mute.listen(1)
    try:
        t0 = time.monotonic()
        result = run_cli("--socket", sock, "--kernel", "6.18", "--upstream", sock + ".mute")
        assert result.returncode == 5 and "--upstream" in result.stderr
        assert 4 < time.monotonic() - t0 < 15  # the 5 s bound on the greeting
        assert not os.path.exists(sock)
    finally:
        mute.close()
