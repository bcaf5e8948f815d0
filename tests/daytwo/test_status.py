"""``hvcpolicy status`` without a daemon: what counts as drift, the table, and exit 5."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

from hvcpolicy import XMLNS
from hvcpolicy import catalogue as cat
from hvcpolicy.cli.daytwo import status_lines
from hvcpolicy.compliance import differences as compliance_differences
from hvcpolicy.compliance import reference
from hvcpolicy.domainxml import Applied
from hvcpolicy.libvirt_status import DRIFT, MATCH, Row
from hvcpolicy.policy import Policy, load_policy_file
from hvcpolicy.snapshot import load_snapshot
from tests.conftest import EXAMPLES, REPO

HOST_6_18 = load_snapshot(str(EXAMPLES / "hosts" / "neoverse-n1_linux-6.18.json")).registers
FLEET = load_policy_file(str(EXAMPLES / "policies" / "fleet-2026.yaml"))


def differences(
    live: dict[int, int], applied: dict[int, int] | None, policy: Policy | None
) -> list[str]:
    """What status (and reconnect, and apply's verify) reports for one vCPU: the one rule."""
    ref = reference(policy, live, applied)
    return [] if ref is None else compliance_differences(ref, live)


def test_a_guest_reading_its_record_matches() -> None:
    record = dict(HOST_6_18)
    assert differences(HOST_6_18, record, FLEET) == []


def test_a_bit_the_record_lacks_is_drift() -> None:
    record = {**HOST_6_18, cat.VENDOR_HYP_BMAP: 0x1}
    assert differences(HOST_6_18, record, FLEET) == [
        "VENDOR_HYP_BMAP (0x6030000000160002): reads 0x3, <hvc:applied> says 0x1"
    ]


def test_a_register_the_guest_never_carried_drifts_only_when_it_offers_something() -> None:
    record = {r: v for r, v in HOST_6_18.items() if r != cat.VENDOR_HYP_BMAP_2}
    assert differences(HOST_6_18, record, None) == []  # cleared to 0 on arrival: nothing new
    live = {**HOST_6_18, cat.VENDOR_HYP_BMAP_2: 0x1}
    assert differences(live, record, None) == [
        "VENDOR_HYP_BMAP_2 (0x6030000000160003): reads 0x1, not in <hvc:applied> "
        "(services the guest was never given)"
    ]


def test_mitigation_levels_are_not_compared() -> None:
    # the kernel reads the host's level whatever was written: not drift
    record = {**HOST_6_18, cat.SMCCC_ARCH_WORKAROUND_1: 1}
    assert differences(HOST_6_18, record, None) == []


def test_without_a_record_the_policy_plan_is_the_reference() -> None:
    # fleet-2026 denies pv-time and pins PSCI 1.1: the host's fresh values do not conform
    diffs = differences(HOST_6_18, None, FLEET)
    assert "STD_HYP_BMAP (0x6030000000160001): reads 0x1, policy 'fleet-2026' says 0x0" in diffs
    assert (
        "PSCI_VERSION (0x6030000000140000): reads 0x10003, policy 'fleet-2026' says 0x10001"
        in diffs
    )
    conforming = {**HOST_6_18, cat.STD_HYP_BMAP: 0, cat.PSCI_VERSION: cat.PSCI_1_1}
    assert differences(conforming, None, FLEET) == []


def test_the_table_has_one_line_per_domain() -> None:
    rows = [
        Row("web1", "u1", 3, "running", "fleet-2026", "domain",
            Applied("node-17", "6.1.0-18-arm64", "2026-11-24T23:00:00Z", {}), MATCH,
            "libvirt", "as recorded"),
        Row("batch7", "u2", None, "shut off", "default", "default"),
        Row("web2", "u3", 4, "running", "fleet-2026", "domain", None, DRIFT, "libvirt",
            "STD_HYP_BMAP (0x6030000000160001): expected 0x0, reads 0x1"),
    ]  # fmt: skip
    lines = status_lines(rows)
    assert len(lines) == 5
    assert lines[2].split()[:5] == ["3", "web1", "running", "fleet-2026", "node-17"]
    assert lines[2].endswith("match: as recorded")
    assert lines[3].split()[:4] == ["-", "batch7", "shut", "off"]
    assert " default* " in lines[3]  # the implicit default policy is starred
    assert lines[4].endswith("DRIFT: STD_HYP_BMAP (0x6030000000160001): expected 0x0, reads 0x1")


def test_status_of_an_unreachable_libvirt_exits_5_with_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "hvcpolicy", "status", "--connect",
         "qemu+unix:///system?socket=/nonexistent/libvirt-sock"],
        capture_output=True, text=True, cwd=REPO, env=dict(os.environ), timeout=60,
    )  # fmt: skip
    assert done.returncode == 5, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hvcpolicy: libvirt qemu+unix:///system")
    assert "Traceback" not in done.stderr


def _test_driver_domain(conn: Any, name: str, meta: str = "") -> str:
    return (
        f"<domain type='test'><name>{name}</name>{meta}<memory>131072</memory><vcpu>1</vcpu>"
        "<os><type arch='aarch64'>hvm</type></os></domain>"
    )


def test_collect_on_libvirts_test_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    """libvirt's in-process test driver: no daemon, no QMP socket (so a running managed domain
    has no interface hvcpolicy reads), and a domain that vanishes while listed is left out."""
    import libvirt

    from hvcpolicy import libvirt_status

    uri = "test:///default"
    conn = libvirt.open(uri)
    meta = f'<metadata><hvc:policy xmlns:hvc="{XMLNS}" ref="fleet-2026"/></metadata>'
    web = conn.defineXML(_test_driver_domain(conn, "web-t", meta))
    web.create()
    conn.defineXML(_test_driver_domain(conn, "idle-t"))
    gone = conn.createXML(_test_driver_domain(conn, "gone-t"), 0)
    listed = libvirt_status.list_domains(conn)
    gone.destroy()  # transient: destroyed is undefined
    monkeypatch.setattr(libvirt_status, "list_domains", lambda _c: listed)
    rows = {r.name: r for r in libvirt_status.collect(uri, str(EXAMPLES / "policies"), 1.0)}
    assert "gone-t" not in rows
    w = rows["web-t"]
    assert (w.state, w.policy, w.policy_source, w.live) == ("running", "fleet-2026", "domain",
                                                            "no-interface")  # fmt: skip
    assert "no QMP socket for hvcpolicy" in w.detail
    i = rows["idle-t"]
    assert (i.state, i.id, i.policy, i.policy_source, i.live) == (
        "shut off", None, "default", "default", "-"
    )  # fmt: skip
    # running domains first, by id; then the others by name
    names = list(rows)
    assert names.index("web-t") < names.index("idle-t")
    # and with no default policy, the running, unannotated "test" domain is unmanaged
    rows = {r.name: r for r in libvirt_status.collect(uri, "/nonexistent", 1.0)}
    assert (rows["test"].policy, rows["test"].live) == (None, "unmanaged")
    conn.close()


def test_status_exit_codes_by_priority() -> None:
    from hvcpolicy.cli.daytwo import status_exit

    def rows(*lives: str) -> list[Row]:
        return [Row(f"d{i}", "u", None, "running", live=live) for i, live in enumerate(lives)]

    assert status_exit(rows(MATCH, "-", "unmanaged", "no-interface")) == 0
    assert status_exit(rows(MATCH, "unreachable")) == 5
    assert status_exit(rows("unreachable", "invalid")) == 4
    assert status_exit(rows("invalid", DRIFT, "unreachable")) == 3
    assert status_exit([]) == 0


def test_status_and_reconnect_hold_a_guest_to_the_same_rule(tmp_path: Any) -> None:
    """One compliance rule: a running guest whose record lacks a bitmap it still offers
    (VENDOR_HYP_BMAP reads 0x3) is DRIFT for ``status`` and ``differs`` for the hook's
    ``reconnect``; once reconnect logged it ``verified`` (it looked only at what the record
    names) while status said DRIFT."""
    import libvirt

    from hvcpolicy import libvirt_status
    from hvcpolicy.domainxml import render_policy, with_applied
    from tests.hardening.simthread import run_hook, simulators

    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "open.json").write_text(
        '{"apiVersion": "hvcpolicy/v1", "kind": "FirmwarePolicy", "metadata": {"name": "open"},'
        ' "spec": {"unknown": "allow"}}'
    )
    conf = tmp_path / "hook.conf"
    conf.write_text(
        f"policy_dir = {policies}\nhost_snapshot = {EXAMPLES / 'hosts/neoverse-n1_linux-6.18.json'}"
        f"\ncache_dir = {tmp_path / 'cache'}\naudit_file = {tmp_path / 'audit.log'}\n"
        "qmp_timeout = 2\n"
    )
    with simulators(1, vcpus=2, runstate="running") as [sim]:
        record = {r: v for r, v in sim.fresh.items() if r != cat.VENDOR_HYP_BMAP}
        assert sim.fresh[cat.VENDOR_HYP_BMAP] == 0x3
        meta = parse_policy_element(sim.path)
        element = render_policy(with_applied(meta, Applied("h", "6.18", "t", record)))
        xml = (
            f"<domain type='test'><name>drift-t</name><metadata>{element}</metadata>"
            "<memory>131072</memory><vcpu>1</vcpu><os><type arch='aarch64'>hvm</type></os>"
            "</domain>"
        )
        conn = libvirt.open("test:///default")
        try:
            dom = conn.defineXML(xml)
            dom.create()
            found = libvirt_status.collect("test:///default", str(policies), 2.0)
            rows = {r.name: r for r in found}
            live_xml = dom.XMLDesc(0)
        finally:
            conn.close()
        hook = run_hook(str(conf), ["drift-t", "reconnect", "begin", "-"], live_xml.encode())
    row = rows["drift-t"]
    assert (row.live, row.via) == (DRIFT, "hvc:qmp")
    assert row.detail == (
        "VENDOR_HYP_BMAP (0x6030000000160002): reads 0x3, not in <hvc:applied> "
        "(services the guest was never given)"
    )
    assert hook.rc == 0 and hook.stderr == ""
    (line,) = [x for x in (tmp_path / "audit.log").read_text().splitlines() if "reconnect" in x]
    assert "outcome=differs" in line and "services the guest was never given" in line


def parse_policy_element(sock: str) -> Any:
    from hvcpolicy.domainxml import parse_domain

    xml = (
        f'<domain><name>x</name><metadata><hvc:policy xmlns:hvc="{XMLNS}" ref="open">'
        f'<hvc:qmp socket="{sock}"/></hvc:policy></metadata></domain>'
    )
    return parse_domain(xml.encode(), "test").meta
