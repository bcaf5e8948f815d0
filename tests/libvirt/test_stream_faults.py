"""Faults during the stream backend's cycle, with the real libvirtd and QEMU 7.2 (TCG): each ends
with exit != 0 and one line saying where the guest is and how to recover; no guest is resumed
with values that were not read back; no image of a guest that is not running is deleted; and
the recovery the line names works.

``hvcpolicy start`` is stopped at a step by ``HVCPOLICY_TEST_FAULT`` (SIGSTOP, the test acts,
SIGCONT) or killed there (SIGKILL). The guests use policy ``noptp``: this host's snapshot
offers ptp, so start saves first (the TCG image has no firmware register, so nothing is
patched, but the save, the restore with ``<hvc:applied>`` and the read-back all run).
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

from hvcpolicy.errors import EXIT_OK, EXIT_UNAVAILABLE
from tests.libvirt.conftest import SYSTEM_URI, Daemon, Lab, pid_from, stop_pid, virsh, wait_for
from tests.libvirt.stock import (
    carry_on,
    cleanup,
    define_stock,
    hvc_start,
    images,
    live_xml,
    one_line,
    state,
    stopped_at,
)


@pytest.fixture()
def save_dir(lab: Lab) -> Path:
    return lab.root / f"save-{uuid.uuid4().hex[:6]}"


def _saved_image(save_dir: Path) -> Path:
    kept = [p for p in save_dir.iterdir() if p.name.endswith(".save")]
    assert len(kept) == 1, images(save_dir)
    return kept[0]


def _recovers(lab: Lab, name: str, save_dir: Path) -> None:
    """The documented recovery: `hvcpolicy start NAME` again, which starts afresh."""
    done = hvc_start(lab, name, save_dir)
    assert done.returncode == EXIT_OK, done.stderr
    assert state(name) == "running"
    assert 'backend="stream"' in live_xml(name)
    assert images(save_dir) == []


@pytest.mark.parametrize(
    ("step", "left"),
    [
        ("started", "paused"),  # paused start done, nothing saved yet
        ("saved", "shut off"),  # QEMU gone, the image is the guest
        ("restored", "paused"),  # restored paused, not read back yet
        ("read-back", "paused"),  # read back, not resumed
    ],
)
def test_start_killed_at_each_step_is_recovered_by_starting_again(
    lab: Lab, system_libvirtd: Daemon, save_dir: Path, step: str, left: str
) -> None:
    name = define_stock(lab, "noptp")
    try:
        done = hvc_start(lab, name, save_dir, fault=f"{step}:kill")
        assert done.returncode == -9, done.stderr
        assert state(name) == left  # never running: nothing resumed it
        if step != "started":
            _saved_image(save_dir)  # the never-run image is kept while the guest does not run
        _recovers(lab, name, save_dir)
    finally:
        cleanup(name)


def test_the_image_changed_by_someone_else_is_not_restored(
    lab: Lab, system_libvirtd: Daemon, save_dir: Path
) -> None:
    name = define_stock(lab, "noptp")
    try:
        proc = stopped_at(lab, name, save_dir, "saved")
        image = _saved_image(save_dir)
        with open(image, "r+b") as f:  # the same byte written back: only the write is seen
            first = f.read(1)
            f.seek(0)
            f.write(first)
        rc, _out, err = carry_on(proc)
        assert rc == EXIT_UNAVAILABLE
        line = one_line(err)
        assert "changed (or removed) by someone else" in line and "not restored" in line
        assert "shut off" in line and f"hvcpolicy start {name}" in line
        assert state(name) == "shut off"
        assert image.exists()
        _recovers(lab, name, save_dir)
    finally:
        cleanup(name)


def test_the_domain_destroyed_mid_cycle(lab: Lab, system_libvirtd: Daemon, save_dir: Path) -> None:
    name = define_stock(lab, "noptp")
    try:
        proc = stopped_at(lab, name, save_dir, "restored")
        virsh(SYSTEM_URI, "destroy", name)
        rc, _out, err = carry_on(proc)
        assert rc == EXIT_UNAVAILABLE
        line = one_line(err)
        assert "shut off" in line and f"hvcpolicy start {name}" in line
        assert state(name) == "shut off"
        assert str(_saved_image(save_dir)) in line
        _recovers(lab, name, save_dir)
    finally:
        cleanup(name)


def test_the_domain_started_by_someone_else_mid_cycle(
    lab: Lab, system_libvirtd: Daemon, save_dir: Path
) -> None:
    """Between the save and the restore the domain is shut off and the start lock says "busy":
    someone else's start gets the whole hook, which refuses this guest (its QEMU offers no
    interface, it has no QMP socket: enforcement.unsupported-qemu), so start's cycle goes on."""
    name = define_stock(lab, "noptp")
    try:
        proc = stopped_at(lab, name, save_dir, "saved")
        other = virsh(SYSTEM_URI, "start", name, check=False)
        assert other.returncode != 0 and "hvcpolicy" in other.stderr
        rc, _out, err = carry_on(proc)
        assert rc == EXIT_OK, err
        assert state(name) == "running" and 'backend="stream"' in live_xml(name)
        assert images(save_dir) == []
    finally:
        cleanup(name)


def test_a_domain_someone_else_started_is_left_running(
    lab: Lab, system_libvirtd: Daemon, save_dir: Path
) -> None:
    """The same, for a guest with a QMP socket (as `hvcpolicy attach` leaves it) and a policy
    that lets the other start run although this host's defaults differ (already-running:
    warn): the hook reads the runstate over QEMU's own QMP, warns, and the guest runs; start's
    restore then fails, and start says so and leaves that guest alone."""
    lab.write_policy(
        "noptp-warn",
        {
            "features": {"ptp": "deny"},
            "unknown": "allow",
            "enforcement": {"already-running": "warn"},
        },
    )
    name = define_stock(lab, "noptp-warn", qmp=True)
    try:
        proc = stopped_at(lab, name, save_dir, "saved")
        virsh(SYSTEM_URI, "start", name)
        rc, _out, err = carry_on(proc)
        assert rc == EXIT_UNAVAILABLE
        line = one_line(err)
        assert "someone else started the domain" in line and f"virsh destroy {name}" in line
        assert state(name) == "running"  # not ours to stop
        assert _saved_image(save_dir).exists()
        warned = [x for x in lab.audit() if f"domain={name}" in x and "differs-warned" in x]
        assert warned and "stage=started/running" in warned[-1]
    finally:
        cleanup(name)


def test_a_full_save_directory(lab: Lab, system_libvirtd: Daemon) -> None:
    """A 256 KiB tmpfs: libvirt's save fails for lack of space; the guest never ran and is
    shut off; no partial image is taken for the guest."""
    mnt = lab.root / f"full-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(mnt)], check=True
    )
    name = define_stock(lab, "noptp")
    try:
        done = hvc_start(lab, name, mnt)
        assert done.returncode == EXIT_UNAVAILABLE
        line = one_line(done.stderr)
        assert "libvirt save" in line and "shut off" in line
        assert f"hvcpolicy start {name}" in line
        assert state(name) == "shut off"
        assert not [p for p in images(mnt) if p.endswith(".save") and os.path.getsize(mnt / p)]
    finally:
        cleanup(name)
        subprocess.run(["umount", str(mnt)], check=True)


def test_libvirtd_restarted_between_save_and_restore(
    lab: Lab, system_libvirtd: Daemon, save_dir: Path
) -> None:
    if not system_libvirtd.owned:
        pytest.fail("this test restarts libvirtd: it needs a daemon these tests started (CI)")
    name = define_stock(lab, "noptp")
    try:
        proc = stopped_at(lab, name, save_dir, "saved")
        pid = system_libvirtd.pid()
        assert pid is not None
        stop_pid(pid, "libvirtd")
        system_libvirtd.start()
        wait_for(lambda: pid_from(system_libvirtd.pidfile, "libvirtd"), 60, "libvirtd")
        rc, _out, err = carry_on(proc)
        assert rc == EXIT_UNAVAILABLE
        line = one_line(err)
        assert "libvirt" in line and f"hvcpolicy start {name}" in line
        assert state(name) == "shut off"
        _saved_image(save_dir)
        _recovers(lab, name, save_dir)
    finally:
        cleanup(name)
