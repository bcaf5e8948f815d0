"""hvcpolicy through a real libvirtd: the hook on every stage, ``start``, migration, restore."""

from __future__ import annotations

import re

from tests.libvirt.conftest import SYSTEM_URI, Guest, Lab

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
    assert "started under policy 'web'" in done.stdout
    assert g.state() == "running"
    lines = audit_for(lab, g, "started/prelaunch")
    assert lines and "outcome=applied" in lines[0], lab.audit()
    assert f"{VENDOR_HYP_BMAP}=0x1" in lines[0].split(" after=")[1]
    assert applied_registers(g.live_xml())[VENDOR_HYP_BMAP] == "0x1"
