"""Golden files for the XML hvcpolicy writes: ``attach``'s edit of a domain definition and the
``<hvc:policy>`` element with ``<hvc:applied>`` that ``start`` and the hook's recorder record
(rendered, and unprefixed as libvirt's metadata API takes it). A change to either shows up as a
diff of ``tests/golden/``; ``pytest --update-golden`` rewrites the files after a deliberate one."""

from __future__ import annotations

from pathlib import Path

import pytest

from hvcpolicy.cli.libvirt import add_to_definition
from hvcpolicy.domainxml import (
    Applied,
    parse_domain,
    render_policy,
    unprefixed,
    with_applied,
)
from hvcpolicy.planner import plan_start
from hvcpolicy.policy import load_policy_file
from hvcpolicy.snapshot import load_snapshot
from tests.conftest import EXAMPLES, Golden

GOLDEN = Path(__file__).resolve().parent.parent / "golden"

# (case, the element attached, QEMU's QMP socket to add: None when the domain has its own)
ATTACH = [
    ("bare", "fleet-2026", "/var/lib/libvirt/qemu/hvcpolicy/db2.qmp"),
    ("reattach", "fleet-2026", "/var/lib/libvirt/qemu/hvcpolicy/web1.qmp"),
    ("own-qmp", "fleet-2026", None),
]


@pytest.mark.parametrize("case,ref,qmp", ATTACH, ids=[c[0] for c in ATTACH])
def test_attach_definition_edit(golden: Golden, case: str, ref: str, qmp: str | None) -> None:
    xml = (GOLDEN / f"attach-{case}.in.xml").read_text()
    meta = parse_domain(
        f'<domain><name>x</name><metadata><hvc:policy xmlns:hvc="https://hvcpolicy.dev/xmlns/'
        f'libvirt/1" ref="{ref}"><hvc:resume after="apply"/></hvc:policy></metadata></domain>',
        "test",
    ).meta
    assert meta is not None
    out = add_to_definition(xml, render_policy(meta), qmp)
    golden.check(GOLDEN / f"attach-{case}.xml", out + "\n")
    again = parse_domain(out, case)  # what the hook reads back
    assert again.meta is not None and again.meta.ref == ref
    assert again.commandline_qmp == (qmp or again.commandline_qmp)


def test_applied_record(golden: Golden) -> None:
    domain = parse_domain((EXAMPLES / "domains" / "web1.xml").read_bytes(), "web1.xml")
    assert domain.meta is not None
    policy = load_policy_file(str(EXAMPLES / "policies" / "fleet-2026.yaml"))
    snap = load_snapshot(str(EXAMPLES / "hosts" / "neoverse-n1_linux-6.18.json"))
    target = plan_start(policy, snap.registers).target
    applied = Applied(
        host=snap.host, kernel=snap.kernel, at="2026-11-25T00:00:00Z", registers=target
    )
    element = render_policy(with_applied(domain.meta, applied))
    golden.check(GOLDEN / "applied.xml", element + "\n")
    golden.check(GOLDEN / "applied-unprefixed.xml", unprefixed(element) + "\n")
    back = parse_domain(f"<domain><name>w</name><metadata>{element}</metadata></domain>", "t")
    assert back.meta is not None and back.meta.applied is not None
    assert back.meta.applied.registers == target
