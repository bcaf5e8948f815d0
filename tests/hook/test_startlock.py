"""``hvcpolicy/startlock.py`` on its own: the lock ``hvcpolicy start`` holds and its phase."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hvcpolicy import startlock
from hvcpolicy.errors import UsageError
from hvcpolicy.startlock import StartLock


@pytest.mark.parametrize("name", ["", ".", "..", ".hidden", "a/b", "x\0y", "é" * 200])
def test_names_that_are_not_one_file_name_get_no_lock(tmp_path: Path, name: str) -> None:
    assert startlock.lock_path(str(tmp_path), name) is None
    assert StartLock.acquire(str(tmp_path), name) is None
    assert startlock.driving(str(tmp_path), name) is None


def test_one_start_at_a_time_then_the_file_is_gone(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    lock = StartLock.acquire(run, "web1")
    assert lock is not None
    assert (os.stat(run).st_mode & 0o777, os.stat(lock.path).st_mode & 0o777) == (0o755, 0o600)
    assert os.stat(os.path.dirname(lock.path)).st_mode & 0o777 == 0o700
    with pytest.raises(UsageError, match="being started by another `hvcpolicy start`"):
        StartLock.acquire(run, "web1")
    other = StartLock.acquire(run, "web2")  # another domain is another lock
    assert other is not None
    other.release()
    lock.release()
    assert not os.path.exists(lock.path)
    again = StartLock.acquire(run, "web1")
    assert again is not None
    again.release()


def test_the_phase_is_what_the_hook_reads_while_the_lock_is_held(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    assert startlock.driving(run, "web1") is None  # nobody there
    with StartLock.acquire(run, "web1", startlock.START) as lock:  # type: ignore[union-attr]
        assert startlock.driving(run, "web1") == "start"
        assert startlock.steps_aside(run, "web1", "prepare")
        assert not startlock.steps_aside(run, "web1", "restore")
        lock.phase(startlock.RESTORE)
        assert startlock.steps_aside(run, "web1", "restore")
        lock.phase(startlock.BUSY)  # between its own steps: someone else's start is not its own
        assert startlock.driving(run, "web1") == "busy"
        assert not any(startlock.steps_aside(run, "web1", s) for s in ("prepare", "started"))
        path = lock.path
    # a file left by a start that is gone (killed: no release) is not a holder
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    Path(path).write_text("start\n")
    os.chmod(path, 0o600)
    assert startlock.driving(run, "web1") is None
    # and the next start takes it over
    with StartLock.acquire(run, "web1") as lock:  # type: ignore[union-attr]
        assert Path(lock.path).read_text() == "busy\n"


def test_a_place_others_can_write_is_not_used(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "start").mkdir(parents=True)
    os.chmod(run / "start", 0o777)
    assert StartLock.acquire(str(run), "web1") is None
    assert startlock.driving(str(run), "web1") is None
    os.chmod(run / "start", 0o700)
    (run / "start" / "web1").write_text("start\n")
    os.chmod(run / "start" / "web1", 0o666)
    assert StartLock.acquire(str(run), "web1") is None
    assert startlock.driving(str(run), "web1") is None
    os.symlink("/etc/passwd", run / "start" / "web2")
    assert StartLock.acquire(str(run), "web2") is None
    assert startlock.driving(str(run), "web2") is None
