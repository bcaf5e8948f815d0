"""hvcpolicy through a real libvirtd: the hook on every stage, ``start``, migration, restore."""

from __future__ import annotations

import os
import re
import time
from typing import Any

from tests.libvirt.conftest import (
    HOSTS,
    MIGRATION_PORT,
    SESSION_HOME,
    SESSION_URI,
    SYSTEM_URI,
    Guest,
    Lab,
    stop_pid,
    virsh,
    wait_for,
)

VENDOR_HYP_BMAP = "0x6030000000160002"


def audit_for(lab: Lab, guest: Guest, stage: str, daemon: str = "system") -> list[str]:
    return [
        line
        for line in lab.audit(daemon)
        if f"domain={guest.name} " in line and f"stage={stage} " in line
    ]


def applied_registers(xml: str) -> dict[str, str]:
    block = re.search(r"<hvc:applied .*?</hvc:applied>", xml, re.S)
    assert block, f"no <hvc:applied> in the live XML:\n{xml}"
    return dict(re.findall(r'<hvc:register id="(0x[0-9a-f]+)" value="(0x[0-9a-f]+)"', block[0]))


def test_hvcpolicy_start_applies_while_prelaunch(lab: Lab, guest_factory) -> None:
    g = guest_factory("web")
    done = lab.hvcpolicy("start", g.name, "--connect", SYSTEM_URI)
    assert "started under policy 'web' (applied, qmp backend)" in done.stdout
    assert g.state() == "running"
    # start owns the start: it ran the host check, applied over QMP, recorded and resumed, and
    # wrote one line for it; the hook's prepare and started stepped aside (its lock's phase)
    lines = audit_for(lab, g, "start")
    assert len(lines) == 1 and "outcome=applied" in lines[0], lab.audit()
    assert "backend=qmp" in lines[0] and "by=start" in lines[0]
    assert f"{VENDOR_HYP_BMAP}=0x1" in lines[0].split(" after=")[1]
    assert applied_registers(g.live_xml())[VENDOR_HYP_BMAP] == "0x1"
    prepare = audit_for(lab, g, "prepare")
    assert len(prepare) == 1 and "outcome=allowed" in prepare[0] and "by=start" in prepare[0]
    assert audit_for(lab, g, "started/prelaunch") == []  # no stage ran the hook's Python
    time.sleep(1)
    assert audit_for(lab, g, "started/recorder") == []  # and no recorder was forked
    assert not os.path.exists(f"/run/hvcpolicy/start/{g.name}")


def test_hvcpolicy_start_refuses_before_anything_starts(lab: Lab, guest_factory) -> None:
    g = guest_factory("needs-future")
    done = lab.hvcpolicy("start", g.name, "--connect", SYSTEM_URI, check=False)
    assert done.returncode == 3, done.stderr
    assert "cannot start on this host" in done.stderr
    assert g.state() == "shut off"
    assert audit_for(lab, g, "prepare") == []  # refused before libvirt ran any stage


def test_hvcpolicy_start_with_resume_after_apply_in_the_domain_too(lab: Lab, guest_factory) -> None:
    # the hook applies and its recorder may resume before `start` does: both paths agree
    g = guest_factory("web", resume=True)
    lab.hvcpolicy("start", g.name, "--connect", SYSTEM_URI)
    wait_for(lambda: g.state() == "running", 20, f"{g.name} running")
    assert applied_registers(g.live_xml())[VENDOR_HYP_BMAP] == "0x1"


def test_virsh_start_paused_resumes_after_apply(lab: Lab, guest_factory) -> None:
    g = guest_factory("web", resume=True)
    t0 = time.monotonic()
    virsh(SYSTEM_URI, "start", "--paused", g.name)
    elapsed = time.monotonic() - t0
    # the hook returned without waiting for its detached child (which holds none of its pipes)
    assert elapsed < 5, f"virsh start --paused took {elapsed:.2f} s"
    wait_for(lambda: g.state() == "running", 20, f"{g.name} to be resumed by the recorder")
    lines = audit_for(lab, g, "started/prelaunch")
    assert lines and "outcome=applied" in lines[0]
    wait_for(lambda: "<hvc:applied" in g.live_xml(), 20, "<hvc:applied> in the live XML")
    assert applied_registers(g.live_xml())[VENDOR_HYP_BMAP] == "0x1"
    rec = wait_for(lambda: audit_for(lab, g, "started/recorder"), 20, "the recorder's audit line")
    assert "outcome=recorded-resumed" in rec[0]


def test_plain_start_refused_when_registers_differ(lab: Lab, guest_factory) -> None:
    g = guest_factory("web")
    done = virsh(SYSTEM_URI, "start", g.name, check=False)
    assert done.returncode != 0
    assert "already running and its firmware registers differ" in done.stderr
    assert f"hvcpolicy start {g.name}" in done.stderr
    assert "virsh start --paused" in done.stderr
    assert g.state() == "shut off"
    assert "outcome=refused" in audit_for(lab, g, "started/running")[0]


def test_plain_start_of_a_conforming_guest(lab: Lab, guest_factory) -> None:
    g = guest_factory("open")
    virsh(SYSTEM_URI, "start", g.name)
    assert g.state() == "running"
    assert "outcome=verified" in audit_for(lab, g, "started/running")[0]


def test_prepare_refuses_a_require_the_host_lacks(lab: Lab, guest_factory) -> None:
    g = guest_factory("needs-future")
    done = virsh(SYSTEM_URI, "start", "--paused", g.name, check=False)
    assert done.returncode != 0
    assert "cannot start on this host (lab-source" in done.stderr
    assert "requires 0x6030000000160004:0" in done.stderr
    assert g.state() == "shut off"
    assert "outcome=refused" in audit_for(lab, g, "prepare")[0]
    # refused before QEMU existed: no simulator was ever needed
    assert not audit_for(lab, g, "started/prelaunch")


def test_restore_refused_on_a_host_that_cannot_take_the_guest(
    lab: Lab, guest_factory, tmp_path
) -> None:
    g = guest_factory("web")
    lab.hvcpolicy("start", g.name, "--connect", SYSTEM_URI)
    image = tmp_path / f"{g.name}.save"
    virsh(SYSTEM_URI, "save", g.name, str(image))
    assert g.state() == "shut off"
    lab.set_host("system", "neoverse-n1_linux-6.1.json", "lab-source-downgraded")
    try:
        done = virsh(SYSTEM_URI, "restore", str(image), check=False)
    finally:
        lab.set_host("system", "neoverse-n1_linux-6.18.json", "lab-source")
    assert done.returncode != 0
    assert "refuses a restore of domain" in done.stderr
    assert "VENDOR_HYP_BMAP_2" in done.stderr
    assert image.exists()
    assert g.state() == "shut off"
    assert "outcome=refused" in audit_for(lab, g, "restore")[0]


def test_reconnect_leaves_the_guest_running(lab: Lab, guest_factory, system_libvirtd) -> None:
    assert system_libvirtd.owned, "the test restarts the libvirtd it started"
    g = guest_factory("open")
    virsh(SYSTEM_URI, "start", g.name)
    pid = system_libvirtd.pid()
    assert pid is not None
    stop_pid(pid, "libvirtd")
    system_libvirtd.start()
    assert g.state() == "running"
    lines = wait_for(lambda: audit_for(lab, g, "reconnect"), 20, "the reconnect audit line")
    assert "outcome=verified" in lines[0]


def _migrate(lab: Lab, g: Guest, guest_factory) -> Any:
    """Migrate ``g`` to the session daemon, with its QMP sockets moved to the session user's
    directory (both daemons run on this one machine) and a simulator for the destination QEMU."""
    dest_qemu = str(SESSION_HOME / "hvcpolicy" / f"{g.name}.qmp")
    dest_sim = str(SESSION_HOME / "hvcpolicy" / f"{g.name}.sim")
    xml = virsh(SYSTEM_URI, "dumpxml", "--migratable", g.name).stdout
    xml = xml.replace(g.qemu_socket, dest_qemu).replace(g.sim_socket, dest_sim)
    dest_xml = lab.root / f"{g.name}-dest.xml"
    dest_xml.write_text(xml)
    dest_xml.chmod(0o644)
    guest_factory.sims.watch(dest_qemu, dest_sim, session=True)
    return virsh(
        SYSTEM_URI,
        "migrate",
        "--live",
        g.name,
        SESSION_URI,
        f"tcp://127.0.0.1:{MIGRATION_PORT}",
        "--xml",
        str(dest_xml),
        check=False,
        timeout=180,
    )


def _migrate_to(
    lab: Lab,
    g: Guest,
    guest_factory,
    fixture: str,
    host: str,
    registers: dict[str, str] | None = None,
) -> Any:
    """``_migrate`` to a destination whose snapshot is ``fixture`` (as ``host``, with
    ``registers`` changed); the destination's usual snapshot is put back afterwards."""
    lab.set_host("session", fixture, host, registers)
    try:
        return _migrate(lab, g, guest_factory)
    finally:
        lab.set_host("session", "neoverse-n1_linux-6.18.json", "lab-destination")


def test_migration_refused_by_a_destination_lacking_a_carried_register(
    lab: Lab, guest_factory, session_libvirtd
) -> None:
    g = guest_factory("web")
    lab.hvcpolicy("start", g.name, "--connect", SYSTEM_URI)
    assert "0x6030000000160003" in applied_registers(g.live_xml())  # VENDOR_HYP_BMAP_2
    # asked ahead, through libvirt (the live XML and its record), the answer is the same
    ask = lab.hvcpolicy(
        "check-migration", "--domain", g.name, "--connect", SYSTEM_URI,
        "--to", str(HOSTS / "neoverse-n1_linux-6.1.json"), check=False,
    )  # fmt: skip
    assert ask.returncode == 3 and "VENDOR_HYP_BMAP_2" in ask.stdout + ask.stderr
    done = _migrate_to(lab, g, guest_factory, "neoverse-n1_linux-6.1.json", "lab-destination-6-1")
    assert done.returncode != 0
    assert "refuses an incoming migration of domain" in done.stderr
    assert "VENDOR_HYP_BMAP_2" in done.stderr and "missing on the destination" in done.stderr
    assert g.state() == "running"  # the source keeps running
    assert "outcome=refused" in audit_for(lab, g, "migrate", "session")[0]
    assert virsh(SESSION_URI, "domstate", g.name, check=False).returncode != 0


def test_migration_refused_for_an_applied_value_the_destination_kernel_rejects(
    lab: Lab, guest_factory, session_libvirtd
) -> None:
    g = guest_factory("web")
    lab.hvcpolicy("start", g.name, "--connect", SYSTEM_URI)
    assert applied_registers(g.live_xml())["0x6030000000140001"] == "0x2"  # WA1 NOT_REQUIRED
    # a destination CPU that needs the Spectre-v2 mitigation (WA1 level 1, AVAIL): the kernel
    # accepts a WA1 value only up to its own level, so loading 0x2 there fails
    done = _migrate_to(
        lab, g, guest_factory, "neoverse-n1_linux-6.18.json", "lab-destination-wa1-avail",
        {"0x6030000000140001": "0x1"},
    )  # fmt: skip
    assert done.returncode != 0
    assert "= 0x2: the destination kernel would reject it" in done.stderr
    assert "mitigation level is 1 (EINVAL)" in done.stderr
    assert g.state() == "running"


def test_migration_refused_for_an_applied_bit_the_destination_lacks(
    lab: Lab, guest_factory, session_libvirtd
) -> None:
    g = guest_factory("web")
    lab.hvcpolicy("start", g.name, "--connect", SYSTEM_URI)
    carried = applied_registers(g.live_xml())
    # a bitmap the guest carries a bit of, on a destination kernel built without that service:
    # its fresh read (which is its supported mask) lacks the bit, so loading the value fails
    rid, value = next(
        (r, int(carried[r], 16))
        for r in ("0x6030000000160002", "0x6030000000160000", "0x6030000000160001")
        if int(carried.get(r, "0x0"), 16)
    )
    done = _migrate_to(
        lab, g, guest_factory, "neoverse-n1_linux-6.18.json", "lab-destination-lacking-a-bit",
        {rid: hex(value & (value - 1))},  # the lowest bit the guest carries, gone
    )  # fmt: skip
    assert done.returncode != 0
    assert "the destination kernel would reject it" in done.stderr
    assert "are not supported there (EINVAL)" in done.stderr
    assert g.state() == "running"


def test_migration_to_a_compatible_destination(lab: Lab, guest_factory, session_libvirtd) -> None:
    g = guest_factory("web")
    lab.hvcpolicy("start", g.name, "--connect", SYSTEM_URI)
    done = _migrate(lab, g, guest_factory)
    try:
        assert done.returncode == 0, done.stderr
        assert virsh(SESSION_URI, "domstate", g.name).stdout.strip() == "running"
        assert g.state() == "shut off"
        assert "outcome=allowed" in audit_for(lab, g, "migrate", "session")[0]
        inmig = wait_for(lambda: audit_for(lab, g, "started/inmigrate", "session"), 10, "inmigrate")
        assert "outcome=" in inmig[0]
        # <hvc:applied> travelled with the guest
        assert VENDOR_HYP_BMAP in applied_registers(virsh(SESSION_URI, "dumpxml", g.name).stdout)
    finally:
        virsh(SESSION_URI, "destroy", g.name, check=False)


def test_attach_then_virsh_start_paused(lab: Lab, guest_factory) -> None:
    g = guest_factory(None, bare=True)  # a domain hvcpolicy has never seen
    done = lab.hvcpolicy(
        "attach", g.name, "--policy", "web", "--connect", SYSTEM_URI,
        "--qmp-socket", g.sim_socket, "--resume-after-apply",
    )  # fmt: skip
    assert g.qemu_socket in done.stdout
    xml = virsh(SYSTEM_URI, "dumpxml", "--inactive", g.name).stdout
    assert 'ref="web"' in xml and '<hvc:resume after="apply"/>' in xml
    assert f"unix:{g.qemu_socket},server=on,wait=off" in xml
    virsh(SYSTEM_URI, "start", "--paused", g.name)
    wait_for(lambda: g.state() == "running", 20, f"{g.name} resumed after apply")
    wait_for(lambda: "<hvc:applied" in g.live_xml(), 20, "<hvc:applied>")
    assert applied_registers(g.live_xml())[VENDOR_HYP_BMAP] == "0x1"
    # attach again is idempotent: one socket, one policy element
    lab.hvcpolicy("attach", g.name, "--policy", "open", "--connect", SYSTEM_URI)
    xml = virsh(SYSTEM_URI, "dumpxml", "--inactive", g.name).stdout
    assert xml.count("-qmp") == 1 and xml.count("<hvc:policy") == 1 and 'ref="open"' in xml


def test_attach_refuses_a_narrowing_that_would_widen(lab: Lab, guest_factory) -> None:
    # the domain allows ptp; policy web denies it: the domain would widen web
    g = guest_factory("open", extra='<hvc:feature name="ptp" mode="allow"/>')
    refused = lab.hvcpolicy(
        "attach", g.name, "--policy", "web", "--connect", SYSTEM_URI, check=False
    )  # fmt: skip
    assert refused.returncode == 4 and "widens policy 'web'" in refused.stderr
    assert 'ref="open"' in virsh(SYSTEM_URI, "dumpxml", "--inactive", g.name).stdout


def test_install_hook_reloads_the_running_libvirtd(lab: Lab, system_libvirtd) -> None:
    pid = system_libvirtd.pid()
    done = lab.hvcpolicy(*lab.install_args, "--pid-file", str(system_libvirtd.pidfile))
    assert f"libvirtd (pid {pid}) reloaded" in done.stdout
    assert "fleet-2026" not in done.stdout and "web" in done.stdout  # the cache was refreshed
    wait_for(lambda: virsh(SYSTEM_URI, "list", check=False).returncode == 0, 30, "libvirtd")
    assert system_libvirtd.pid() == pid
