"""``hvcpolicy start`` on a stock QEMU (QEMU 7.2, TCG, libvirt 9.0: no firmware-register QMP
interface): the stream backend's cycle through the real libvirtd. See tests/libvirt/stock.py for
what a TCG guest can and cannot prove."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from hvcpolicy.errors import EXIT_REFUSED
from tests.libvirt.conftest import SYSTEM_URI, Daemon, Lab, virsh, wait_for
from tests.libvirt.stock import (
    REVIDR_EL1,
    TPIDR_EL0,
    TPIDRURW,
    cleanup,
    define_stock,
    hvc_start,
    images,
    live_xml,
    one_line,
    state,
    stock_xml,
)


@pytest.fixture()
def save_dir(lab: Lab) -> Path:
    return lab.root / f"save-{uuid.uuid4().hex[:6]}"


def _qemu_starts(name: str) -> int:
    """How many QEMUs libvirt started for ``name`` since the test defined it (its log)."""
    log = Path(f"/var/log/libvirt/qemu/{name}.log")
    return log.read_text().count(": starting up ") if log.exists() else 0


def test_a_guest_whose_defaults_comply_is_read_by_a_snapshot_and_never_stopped(
    lab: Lab, system_libvirtd: Daemon, save_dir: Path
) -> None:
    name = define_stock(lab, "open")
    try:
        done = hvc_start(lab, name, save_dir)
        assert done.returncode == 0, done.stderr
        assert "(unchanged, stream backend)" in done.stdout
        assert state(name) == "running"
        assert _qemu_starts(name) == 1  # read by a memory snapshot: no save, no restore
        xml = live_xml(name)
        assert "<hvc:applied " in xml and 'backend="stream"' in xml
        assert images(save_dir) == []  # the guest runs: nothing kept
        assert os.stat(save_dir).st_mode & 0o777 == 0o700
        line = [x for x in lab.audit() if f"domain={name}" in x and "stage=start " in x]
        assert line and "outcome=unchanged" in line[-1] and "backend=stream" in line[-1]
    finally:
        cleanup(name)


def test_a_guest_predicted_to_need_a_write_goes_through_save_and_restore(
    lab: Lab, system_libvirtd: Daemon, save_dir: Path
) -> None:
    # noptp denies ptp, which this host's snapshot offers: start saves first. The TCG image
    # has no firmware register, so nothing is patched, but the saved guest is restored
    # (its own hook calls step aside), read back and resumed.
    name = define_stock(lab, "noptp")
    try:
        done = hvc_start(lab, name, save_dir)
        assert done.returncode == 0, done.stderr
        assert "stream backend" in done.stdout
        assert state(name) == "running"
        assert _qemu_starts(name) == 2  # the paused start, then the restore
        assert 'backend="stream"' in live_xml(name)
        assert images(save_dir) == []
        # the restore's own prepare/started did not run the hook's Python
        mine = [x for x in lab.audit() if f"domain={name}" in x]
        assert not [x for x in mine if "stage=started" in x], mine
    finally:
        cleanup(name)


def test_a_refusal_writes_nothing_and_leaves_the_guest_shut_off(
    lab: Lab, system_libvirtd: Daemon, save_dir: Path
) -> None:
    # web requires kvm-features: a TCG guest's image has no such register
    name = define_stock(lab, "web")
    try:
        done = hvc_start(lab, name, save_dir)
        assert done.returncode == EXIT_REFUSED, done.stderr
        line = one_line(done.stderr)
        assert "requires" in line and "nothing was written" in line
        assert "shut off" in line and f"hvcpolicy start {name}" in line
        assert state(name) == "shut off"
        kept = [p for p in images(save_dir) if p.endswith(".save")]
        assert len(kept) == 1 and kept[0] in line  # kept, and the message says where
        first = os.stat(save_dir / kept[0])
        # the documented recovery: start again (refused again: its image replaces the old one)
        again = hvc_start(lab, name, save_dir)
        assert again.returncode == EXIT_REFUSED
        assert [p for p in images(save_dir) if p.endswith(".save")] == kept
        assert os.stat(save_dir / kept[0]).st_mtime_ns != first.st_mtime_ns  # a new one
    finally:
        cleanup(name)


def _policy_element(registers: dict[int, int]) -> str:
    return (
        '<hvc:policy xmlns:hvc="https://hvcpolicy.dev/xmlns/libvirt/1" ref="open">'
        '<hvc:applied host="t" kernel="t" at="t" backend="stream"/></hvc:policy>'
    )


@pytest.fixture()
def paused_stock(lab: Lab, system_libvirtd: Daemon) -> Any:
    """A 2-vCPU stock guest libvirt started paused, a libvirt connection, and the domain's
    start lock in the hook's run dir (so the restore's hook calls are this cycle's)."""
    import libvirt

    from hvcpolicy.hook.config import load_config
    from hvcpolicy.startlock import StartLock

    name = f"hvct-{uuid.uuid4().hex[:8]}"
    conn = libvirt.open(SYSTEM_URI)
    dom = conn.defineXML(stock_xml(name, None, vcpus=2))
    dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
    lock = StartLock.acquire(load_config().run_dir, name)
    assert lock is not None
    try:
        yield conn, dom, name, lock
    finally:
        lock.release()
        conn.close()
        cleanup(name)


@pytest.mark.parametrize("snapshot_first", [False, True])
def test_the_cycle_writes_every_vcpu_and_reads_back_what_qemu_holds(
    paused_stock: Any, save_dir: Path, snapshot_first: bool
) -> None:
    """The mechanics with a value: TPIDR_EL0 patched in both vCPUs' lists of the saved image,
    restored paused, read back by a memory snapshot of the running QEMU. The read-back shows
    TPIDRURW, which the patch did not touch, holding the value too: QEMU loaded TPIDR_EL0 into
    its state and its AArch32 alias follows it. So the read-back is of QEMU's live state after
    the load, not an echo of the image."""
    from hvcpolicy import savecycle

    conn, dom, name, lock = paused_stock
    paths = savecycle.Paths(savecycle.image_dir(str(save_dir)), dom.UUIDString())
    fw = savecycle.StreamFirmware(conn, dom, paths, _policy_element, any_register=True, lock=lock)
    before = fw.read()
    assert len(before) == 2 and all(v[TPIDR_EL0] == 0 and v[TPIDRURW] == 0 for v in before)
    assert os.stat(paths.image).st_mode & 0o777 == 0o600
    assert state(name) == "shut off"  # saved: QEMU is gone, the image holds the guest
    fw.write({TPIDR_EL0: 0x5A5A5A5A})
    assert state(name) == "paused"
    after = fw.read()
    assert [(v[TPIDR_EL0], v[TPIDRURW]) for v in after] == [(0x5A5A5A5A, 0x5A5A5A5A)] * 2
    assert 'backend="stream"' in live_xml(name)
    fw.resume()
    assert state(name) == "running"
    assert images(save_dir) == []


def test_qemu_dying_on_the_restore_leaves_the_guest_off_and_the_image_kept(
    paused_stock: Any, save_dir: Path
) -> None:
    """A value QEMU's load refuses (REVIDR_EL1 is constant under TCG, as KVM refuses a bitmap
    bit it lacks): QEMU exits during the restore, libvirt fails it; nothing runs, the image
    stays, and settle() says so."""
    from hvcpolicy import savecycle
    from hvcpolicy.errors import Unavailable

    conn, dom, name, lock = paused_stock
    paths = savecycle.Paths(savecycle.image_dir(str(save_dir)), dom.UUIDString())
    fw = savecycle.StreamFirmware(conn, dom, paths, _policy_element, any_register=True, lock=lock)
    value = fw.read()[0][REVIDR_EL1]
    with pytest.raises(Unavailable, match="libvirt restore"):
        fw.write({REVIDR_EL1: value ^ 0xF0})
    where = fw.settle()
    assert state(name) == "shut off"
    assert "never ran and is shut off" in where and paths.image in where
    assert os.path.exists(paths.image)


def test_the_save_image_format_follows_the_host(paused_stock: Any) -> None:
    """libvirt 9.0 and QEMU 7.2 here: raw images (sparse only from QEMU 11 with libvirt
    11.3, where raw restores fail)."""
    from hvcpolicy import libvirt as lv

    conn, dom, _name, _lock = paused_stock
    xml = lv.domain_xml(dom)
    assert 7_000_000 <= lv.qemu_version(conn, xml) < 11_000_000
    assert lv.sparse_saves(conn, xml) is False


def test_start_refuses_a_running_domain(lab: Lab, system_libvirtd: Daemon, save_dir: Path) -> None:
    name = define_stock(lab, "open")
    try:
        assert hvc_start(lab, name, save_dir).returncode == 0
        done = hvc_start(lab, name, save_dir)
        assert done.returncode == 2 and "already running" in one_line(done.stderr)
        assert state(name) == "running"  # never touched
    finally:
        cleanup(name)


def test_virsh_start_paused_with_resume_after_apply_runs_the_cycle_from_the_hooks_child(
    lab: Lab, system_libvirtd: Daemon
) -> None:
    """``virsh start --paused`` of a stock-QEMU guest with ``<hvc:resume after="apply"/>``: the
    hook's started stage (prelaunch, read over QEMU's own QMP socket) spawns the detached child,
    which, once libvirt's start job has ended, runs the same cycle as ``hvcpolicy start`` under
    the domain's start lock: its save, its restore (whose hook calls step aside) and read-back,
    then the resume. The hook itself never calls libvirt."""
    name = define_stock(lab, "noptp", qmp=True, resume=True)
    try:
        virsh(SYSTEM_URI, "start", "--paused", name)
        wait_for(lambda: state(name) == "running", 60, f"{name} running")
        assert _qemu_starts(name) == 2  # the paused start, then the child's restore
        assert 'backend="stream"' in live_xml(name)
        mine = [x for x in lab.audit() if f"domain={name} " in x]
        deferred = [x for x in mine if "outcome=stream-deferred" in x]
        assert len(deferred) == 1 and "stage=started/prelaunch" in deferred[0], mine
        wait_for(
            lambda: [x for x in lab.audit() if f"domain={name} " in x and "started/stream" in x],
            30,
            "the child's audit line",
        )
        child = [x for x in lab.audit() if f"domain={name} " in x and "started/stream" in x]
        assert "outcome=unchanged" in child[0] and "backend=stream" in child[0]
        # the restore's prepare and started were the child's own: no second deferral
        assert len([x for x in lab.audit() if f"domain={name} " in x and "deferred" in x]) == 1
    finally:
        cleanup(name)
