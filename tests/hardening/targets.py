"""The fuzz targets: each takes raw bytes from outside and drives one parser, then everything the
parsed value feeds (merge, planner, renderer), exactly as the commands and the hook do.

A target returns normally or raises :class:`InvalidInput` (exit 4); anything else is a bug.
"""

from __future__ import annotations

from functools import cache

from hvcpolicy import XMLNS
from hvcpolicy.domainxml import parse_domain, render_policy
from hvcpolicy.errors import InvalidInput
from hvcpolicy.merge import merge
from hvcpolicy.planner import check_migration, plan_start
from hvcpolicy.policy import Policy, decode_file, load_policy_file, parse_policy
from hvcpolicy.snapshot import Snapshot, baseline, decode_json, dumps, load_snapshot, parse_snapshot
from tests.hardening.fuzzlib import HERE

EXAMPLES = HERE.parent.parent / "examples"


@cache
def operator_policies() -> tuple[Policy, ...]:
    return tuple(
        load_policy_file(str(EXAMPLES / "policies" / name))
        for name in ("fleet-2026.yaml", "strict-review.json", "default.yaml", "legacy-4-14.yaml")
    )


@cache
def hosts() -> tuple[Snapshot, ...]:
    return tuple(
        load_snapshot(str(EXAMPLES / "hosts" / name))
        for name in ("neoverse-n1_linux-6.18.json", "neoverse-v1_linux-4.14.json")
    )


def policy_target(data: bytes, ext: str = ".yaml", stem: str | None = "fleet-2026") -> None:
    where = f"fuzz/{stem or 'any'}{ext}"
    pol = parse_policy(decode_file(where, data), where, stem)
    # What the parsed policy feeds: the planner, the migration check, its own document.
    for host in hosts():
        plan_start(pol, host.registers)
        check_migration(pol, host, source=hosts()[0])
    again = parse_policy(pol.to_document(), where, stem)
    assert again.features == pol.features and again.psci == pol.psci, "to_document round trip"


def policy_yaml(data: bytes) -> None:
    policy_target(data, ".yaml")


def policy_json(data: bytes) -> None:
    policy_target(data, ".json")


def policy_doc_json(data: bytes) -> None:
    """A tree-mutated document: any name (the stem check is the file's, tested above)."""
    policy_target(data, ".json", None)


def policy_doc_yaml(data: bytes) -> None:
    policy_target(data, ".yaml", None)


def xml_target(data: bytes) -> None:
    dom = parse_domain(data, "fuzz.xml")
    if dom.meta is None:
        return
    # The renderer must produce an element that parses back to the same metadata (no injection).
    wrapped = (
        f"<domain><name>x</name><metadata>{render_policy(dom.meta)}</metadata></domain>"
    ).encode()
    back = parse_domain(wrapped, "rendered")
    assert back.meta == dom.meta, f"render/parse round trip differs: {back.meta} != {dom.meta}"
    applied = dom.meta.applied.registers if dom.meta.applied is not None else None
    for operator in operator_policies():
        try:
            merged = merge(operator, dom.meta, "fuzz.xml")
        except InvalidInput:
            continue
        for host in hosts():
            plan_start(merged, host.registers)
            check_migration(merged, host, applied=applied)


def snapshot_target(data: bytes) -> None:
    snap = parse_snapshot(decode_json(data, "fuzz.json"), "fuzz.json")
    import json

    again = parse_snapshot(json.loads(dumps(snap)), "again")
    assert again == snap, "dumps/parse round trip differs"
    base = baseline([snap, *hosts()])
    for operator in operator_policies():
        plan_start(operator, snap.registers)
        check_migration(operator, snap, source=base)
        check_migration(operator, snap, applied=snap.registers)


XML_TOKENS = [
    b"<!DOCTYPE domain [<!ENTITY a 'aaaa'>]>",
    b'<!ENTITY x SYSTEM "file:///etc/passwd">',
    b"&x;",
    b"&amp;",
    b"&#10;",
    b"&#0;",
    b"<![CDATA[",
    b"]]>",
    b"<?xml version='1.0' encoding='latin-1'?>",
    b"<?xml version='1.0' encoding='utf-16'?>",
    b"<?pi x?>",
    b"<!-- c -->",
    b"<metadata>",
    b"</metadata>",
    b"<hvc:policy xmlns:hvc='" + XMLNS.encode() + b"' ref='fleet-2026'>",
    b"</hvc:policy>",
    b"<hvc:feature name='ptp' mode='deny'/>",
    b"<hvc:feature name='0x6030000000160002:63' mode='require'/>",
    b"<hvc:feature name='0x6030000000160009' mode='allow'/>",
    b"<hvc:unknown mode='refuse'/>",
    b"<hvc:psci version='1.0'/>",
    b"<hvc:qmp socket='/tmp/x.qmp'/>",
    b"<hvc:resume after='apply'/>",
    b"<hvc:applied host='h' kernel='6.1' at='now'>",
    b"</hvc:applied>",
    b"<hvc:register id='0x6030000000160002' value='0xffffffffffffffff'/>",
    b"<hvc:register id='0x6030000000140000' value='0x10003'/>",
    b"xmlns:hvc='https://hvcpolicy.dev/xmlns/libvirt/2'",
    b"xmlns:hvc='" + XMLNS.encode() + b"'",
    b"xmlns='" + XMLNS.encode() + b"'",
    b"<qemu:commandline><qemu:arg value='-qmp'/><qemu:arg value='unix:/x,server=on'/>",
    b"<qemu:arg value='-chardev'/><qemu:arg value='socket,id=m,path=/y'/>",
    b"<qemu:arg value='-mon'/><qemu:arg value='chardev=m,mode=control'/>",
    b"<domain>",
    b"</domain>",
    b"<name>",
    b"</name>",
    b"<uuid>",
    b"<a><a><a><a><a><a><a><a><a><a><a><a><a><a><a><a>",
    b"=",
    b"'",
    b'"',
    b"<",
    b">",
    b"/>",
    b":",
]

POLICY_TOKENS = [
    b"&a ",
    b"*a",
    b"<<: *a",
    b"!!python/object/apply:os.system ['id']",
    b"!!binary aGVsbG8=",
    b"!!set {a, b}",
    b"!!omap [a: 1]",
    b"!!timestamp 2001-12-14",
    b"!!float .inf",
    b"? ",
    b"- ",
    b": ",
    b"---\n",
    b"...\n",
    b"%YAML 1.1\n",
    b"%TAG ! tag:x,2000:\n",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b"#",
    b"|\n  ",
    b">\n  ",
    b"\t",
    b"    ",
    b"trng",
    b"pv-time",
    b"ptp",
    b"discover-impl-cpus",
    b"0x6030000000160002:1",
    b"0x6030000000160003:64",
    b"0x6030000000160007",
    b"0x6030000000140000",
    b"0x6030000000140009",
    b"allow",
    b"deny",
    b"require",
    b"refuse",
    b"warn",
    b'"1.1"',
    b"1.1",
    b'"0.1"',
    b'"65535.65535"',
    b"smccc-arch-workaround-2",
    b"not-required",
    b"features",
    b"unknown",
    b"psci",
    b"version",
    b"workarounds",
    b"enforcement",
    b"metadata",
    b"name",
    b'"name": "fleet-2026"',
    b"fleet-2026",
    b'"',
    b"'",
    b"\\",
    b"null",
    b"~",
    b"yes",
    b"0o17",
    b"1_000",
    b"\xef\xbb\xbf",
]

SNAPSHOT_TOKENS = [
    b'"0x6030000000160002": "0x3"',
    b'"0x6030000000160003": "0x0"',
    b'"0x6030000000140000": "0x10003"',
    b'"0x6030000000140002": "0x1f"',
    b'"0x6030000000170002": "0x1"',
    b'"0x6030000000160002": 3',
    b'"0xffffffffffffffff"',
    b'"0x0"',
    b'"qemu": "11.1.0"',
    b'"qemu": "99999999999999999999.1"',
    b'"taken": "2026-11-24T23:00:00Z"',
    b'"source": "baseline"',
    b'"registers": {}',
    b'"kind": "FirmwarePolicy"',
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b'"',
    b"1e400",
    b"-0",
    b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
    b"\\u0000",
    b"\\udfff",
]
