"""``hvcpolicy/startlock.py`` on its own: the lock ``hvcpolicy start`` holds, and the hand-over."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hvcpolicy import startlock
from hvcpolicy.errors import InvalidInput, UsageError
from hvcpolicy.startlock import StartLock


@pytest.mark.parametrize("name", ["", ".", "..", ".hidden", "a/b", "x\0y", "é" * 200])
def test_names_that_are_not_one_file_name_get_no_lock(tmp_path: Path, name: str) -> None:
    assert startlock.lock_path(str(tmp_path), name) is None
    assert StartLock.acquire(str(tmp_path), name) is None
    assert not startlock.hand_over(str(tmp_path), name, {1: 1}, {1: 1}, "<x/>")


def test_one_start_at_a_time_then_the_file_is_gone(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    lock = StartLock.acquire(run, "web1")
    assert lock is not None
    assert (os.stat(run).st_mode & 0o777, os.stat(lock.path).st_mode & 0o777) == (0o755, 0o600)
    assert os.stat(os.path.dirname(lock.path)).st_mode & 0o777 == 0o700
    with pytest.raises(UsageError, match="being started by another `hvcpolicy start`"):
        StartLock.acquire(run, "web1")
    assert StartLock.acquire(run, "web2") is not None  # another domain is another lock
    assert lock.handed_over() is None  # no hook handed anything
    lock.release()
    assert not os.path.exists(lock.path)
    again = StartLock.acquire(run, "web1")
    assert again is not None
    again.release()


def test_hand_over_reaches_the_holder_and_no_one_else(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    bmap = 0x6030000000160002
    assert not startlock.hand_over(run, "web1", {bmap: 3}, {bmap: 1}, "<p/>")  # nobody there
    with StartLock.acquire(run, "web1") as lock:  # type: ignore[union-attr]
        assert startlock.hand_over(run, "web1", {bmap: 3, 2: 0}, {bmap: 1, 2: 0}, "<p/>")
        handed = lock.handed_over()
        assert handed == startlock.HandOver({bmap: 3, 2: 0}, {bmap: 1, 2: 0}, "<p/>")
        path = lock.path
    assert not os.path.exists(path)
    # a file left by a start that is gone is not a holder: nothing is handed to it
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    Path(path).write_bytes(b"")
    os.chmod(path, 0o600)
    assert not startlock.hand_over(run, "web1", {1: 2}, {1: 2}, "<x/>")
    assert Path(path).read_bytes() == b""


def test_a_new_start_forgets_what_an_earlier_one_was_handed(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    os.makedirs(f"{run}/start", mode=0o700)
    os.chmod(run, 0o755)
    Path(f"{run}/start/web1").write_text('{"before": {}, "after": {"1": 1}, "element": "<o/>"}')
    os.chmod(f"{run}/start/web1", 0o600)
    with StartLock.acquire(run, "web1") as lock:  # type: ignore[union-attr]
        assert lock.handed_over() is None


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"[]",
        b'{"before": {}, "after": {"1": 1}}',
        b'{"after": {"1": 1}, "element": "<a/>"}',
        b'{"before": {}, "after": {"x": 1}, "element": "<a/>"}',
        b'{"before": {"1": -1}, "after": {}, "element": "<a/>"}',
        b'{"before": {}, "after": {"1": true}, "element": "<a/>"}',
        b'{"before": {}, "after": {"1": "0x1"}, "element": "<a/>"}',
        b"{" + b" " * (startlock.MAX_HANDOVER + 1) + b"}",
    ],
)
def test_a_hand_over_that_is_not_one_is_refused(tmp_path: Path, payload: bytes) -> None:
    with StartLock.acquire(str(tmp_path / "run"), "web1") as lock:  # type: ignore[union-attr]
        os.pwrite(lock.fd, payload, 0)
        with pytest.raises(InvalidInput, match="the hook's hand-over"):
            lock.handed_over()


def test_a_place_others_can_write_is_not_used(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "start").mkdir(parents=True)
    os.chmod(run / "start", 0o777)
    assert StartLock.acquire(str(run), "web1") is None
    assert not startlock.hand_over(str(run), "web1", {1: 1}, {1: 1}, "<x/>")
    os.chmod(run / "start", 0o700)
    (run / "start" / "web1").write_text("")
    os.chmod(run / "start" / "web1", 0o666)
    assert StartLock.acquire(str(run), "web1") is None
    os.symlink("/etc/passwd", run / "start" / "web2")
    assert StartLock.acquire(str(run), "web2") is None
    assert not startlock.hand_over(str(run), "web2", {1: 1}, {1: 1}, "<x/>")


def test_start_holds_a_hand_over_to_its_own_plan() -> None:
    from hvcpolicy.cli.libvirt import _check_hand_over
    from hvcpolicy.errors import Refused
    from hvcpolicy.planner import plan_start
    from hvcpolicy.policy import load_policy
    from hvcpolicy.snapshot import load_snapshot

    repo = Path(__file__).resolve().parents[2]
    policy = load_policy(str(repo / "examples" / "policies" / "fleet-2026.yaml"))
    host = load_snapshot(str(repo / "examples" / "hosts" / "neoverse-n1_linux-6.18.json"))
    fresh = dict(host.registers)
    target = plan_start(policy, fresh, host.registers).target
    after = {**fresh, **target}
    _check_hand_over(policy, startlock.HandOver(fresh, after, "<p/>"), host.registers, "d")
    narrowed = [rid for rid in target if target[rid] != fresh[rid]]
    assert narrowed  # the policy denies something this host offers (pv-time)
    wrong = {**after, narrowed[0]: fresh[narrowed[0]]}  # a read-back still offering it
    with pytest.raises(Refused, match="hand-over does not match"):
        _check_hand_over(policy, startlock.HandOver(fresh, wrong, "<p/>"), host.registers, "d")
