"""``hvcpolicy status`` against a real libvirtd (the libvirt tests' harness): every domain with
its policy, its <hvc:applied> record, and its live registers read back and compared."""

from __future__ import annotations

import json
import re
from typing import Any

from hvcpolicy import catalogue as cat
from hvcpolicy import libvirt
from hvcpolicy.domainxml import Applied, parse_domain, render_policy, with_applied
from tests.libvirt.conftest import SYSTEM_QMP_DIR, SYSTEM_URI, Lab, domain_xml, virsh

VENDOR_HYP_BMAP = cat.fmt_id(cat.VENDOR_HYP_BMAP)
EXIT_BY_LIVE = (("DRIFT", 3), ("invalid", 4), ("unreachable", 5))


def status(lab: Lab, *args: str) -> Any:
    return lab.hvcpolicy("status", "--connect", SYSTEM_URI, *args, check=False, timeout=120)


def rows_by_name(lab: Lab) -> tuple[int, dict[str, dict[str, Any]]]:
    done = status(lab, "--format", "json")
    assert done.returncode in (0, 3, 4, 5), done.stderr
    rows = json.loads(done.stdout)
    # other domains on this libvirtd (other suites') count too: the exit status follows all rows
    live = {r["live"] for r in rows}
    expected = next((rc for state, rc in EXIT_BY_LIVE if state in live), 0)
    assert done.returncode == expected, live
    return done.returncode, {r["name"]: r for r in rows}


def test_status_lists_policy_record_and_live_registers(lab: Lab, guest_factory) -> None:
    lab.write_policy(
        "status-warn", {"unknown": "allow", "enforcement": {"unsupported-qemu": "warn"}}
    )
    applied = guest_factory("web")  # started by hvcpolicy: recorded
    lab.hvcpolicy("start", applied.name, "--connect", SYSTEM_URI)
    planned = guest_factory("open")  # plain start of a conforming guest: no record
    virsh(SYSTEM_URI, "start", planned.name)
    stopped = guest_factory(None)  # defined, never started, no metadata (and no default policy)
    # a guest whose only QMP is QEMU's own: what libvirt's pass-through sees of a real QEMU
    bare = f"{applied.name}-noif"
    xml = domain_xml(bare, "status-warn", f"{SYSTEM_QMP_DIR}/{bare}.qmp", "/nonexistent")
    xml = re.sub(r"<hvc:qmp [^>]*/>", "", xml)
    path = lab.root / f"{bare}.xml"
    path.write_text(xml)
    virsh(SYSTEM_URI, "define", str(path))
    try:
        virsh(SYSTEM_URI, "start", bare)

        rc, rows = rows_by_name(lab)
        a = rows[applied.name]
        assert (a["state"], a["policy"], a["policy_source"]) == ("running", "web", "domain")
        assert a["applied"]["host"] == "lab-source"
        assert a["applied"]["registers"][VENDOR_HYP_BMAP] == "0x1"
        assert (a["live"], a["via"], a["differences"]) == ("match", "hvc:qmp", [])
        assert a["registers"][VENDOR_HYP_BMAP] == "0x1"
        assert isinstance(a["id"], int) and a["uuid"]

        p = rows[planned.name]
        assert (p["policy"], p["applied"], p["live"]) == ("open", None, "match")
        assert p["detail"] == "as the policy plans"

        s = rows[stopped.name]
        assert (s["state"], s["id"], s["policy"], s["live"]) == ("shut off", None, None, "-")

        n = rows[bare]
        assert n["state"] == "running" and n["policy"] == "status-warn"
        assert n["live"] == "no-interface"
        assert "kvm-firmware-registers" in n["detail"]  # asked of the real QEMU, via libvirt
        assert n["via"] is None

        # the table: one line per domain, virsh-like
        table = status(lab)
        assert table.returncode == rc
        lines = table.stdout.splitlines()
        assert lines[0].split() == ["Id", "Name", "State", "Policy", "Applied", "Live"]
        line = next(x for x in lines if f" {applied.name} " in x)
        assert "running" in line and " web " in line and "lab-source" in line
        assert line.rstrip().endswith("match: as recorded")
        off = next(x for x in lines if f" {stopped.name} " in x)
        assert off.split()[0] == "-" and "shut off" in off

        # the record no longer matches what the vCPUs read: DRIFT, exit 3, the register named
        live = parse_domain(applied.live_xml(), applied.name)
        assert live.meta is not None and live.meta.applied is not None
        record = dict(live.meta.applied.registers)
        record[cat.VENDOR_HYP_BMAP] = 0x3
        old = live.meta.applied
        edited = with_applied(live.meta, Applied(old.host, old.kernel, old.at, record))
        conn = libvirt.connect(SYSTEM_URI)
        try:
            dom = libvirt.lookup(conn, applied.name)
            libvirt.set_policy_metadata(dom, render_policy(edited), live=True)
        finally:
            conn.close()
        rc, rows = rows_by_name(lab)
        assert rc == 3
        d = rows[applied.name]
        assert d["live"] == "DRIFT"
        assert d["differences"] == [
            f"VENDOR_HYP_BMAP ({VENDOR_HYP_BMAP}): reads 0x1, <hvc:applied> says 0x3"
        ]
        table = status(lab)
        assert table.returncode == 3
        assert "DRIFT: VENDOR_HYP_BMAP" in next(
            x for x in table.stdout.splitlines() if applied.name in x
        )
    finally:
        virsh(SYSTEM_URI, "destroy", bare, check=False, timeout=30)
        virsh(SYSTEM_URI, "undefine", bare, check=False, timeout=30)
