"""Policies, domain XML and the merge: what loads, and every way input is refused."""

from __future__ import annotations

import pytest

from hvcpolicy import catalogue as cat
from hvcpolicy.domainxml import parse_domain, qmp_from_args, render_policy
from hvcpolicy.errors import InvalidInput
from hvcpolicy.merge import merge
from hvcpolicy.policy import Mode, Policy, Unknown, load_policy, load_policy_file, parse_policy
from tests.conftest import EXAMPLES

POLICIES = EXAMPLES / "policies"


def test_example_policies_load() -> None:
    p = load_policy_file(str(POLICIES / "fleet-2026.yaml"))
    assert p.name == "fleet-2026"
    assert p.features[(cat.STD_HYP_BMAP, 0)] is Mode.DENY
    assert p.features[(cat.VENDOR_HYP_BMAP, 0)] is Mode.REQUIRE
    assert p.psci == 0x10001
    assert p.workarounds == {cat.SMCCC_ARCH_WORKAROUND_1: 1}
    strict = load_policy("strict-review", str(POLICIES))
    assert strict.unknown is Unknown.REFUSE


def test_compiled_round_trip() -> None:
    for path in POLICIES.iterdir():
        p = load_policy_file(str(path))
        assert Policy.from_compiled(p.to_compiled()) == p
        assert Policy.from_compiled(p.to_compiled()).features == p.features


def doc(**spec: object) -> dict[str, object]:
    return {
        "apiVersion": "hvcpolicy/v1",
        "kind": "FirmwarePolicy",
        "metadata": {"name": "p"},
        "spec": spec,
    }


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ({"features": {"trgn": "allow"}}, "spec.features.trgn: unknown feature"),
        ({"features": {"ptp": "maybe"}}, "spec.features.ptp"),
        ({"features": {"0x6030000000160002:64": "allow"}}, "0x6030000000160002:64"),
        ({"features": {"0x6030000000140000:1": "allow"}}, "0x6030000000140000:1"),
        ({"features": {"0x6030000000140000": "allow"}}, "set by spec.psci"),
        ({"features": {"0x6030000000140007": "deny"}}, "only bitmap registers"),
        ({"features": {"ptp": "allow", "0x6030000000160002:1": "deny"}}, "names the same bit"),
        ({"unknown": "maybe"}, "spec.unknown"),
        ({"psci": {"version": "1.7"}}, "spec.psci.version"),
        ({"psci": {"version": "one"}}, "spec.psci.version"),
        ({"workarounds": {"smccc-arch-workaround-4": "any"}}, "spec.workarounds"),
        ({"enforcement": {"already-running": "ignore"}}, "spec.enforcement.already-running"),
        ({"featurs": {}}, "featurs"),
    ],
)
def test_bad_policies_name_the_field(spec: dict[str, object], needle: str) -> None:
    with pytest.raises(InvalidInput) as err:
        parse_policy(doc(**spec), "p.yaml", "p")
    assert needle in str(err.value)
    assert str(err.value).startswith("p.yaml: ")
    assert "\n" not in str(err.value)


def test_name_must_equal_stem() -> None:
    with pytest.raises(InvalidInput, match=r"metadata\.name: 'p' differs from the file name 'q'"):
        parse_policy(doc(), "q.yaml", "q")


def test_unknown_register_and_bit_forms() -> None:
    p = parse_policy(
        doc(features={"0x6030000000160002:5": "allow", "0x6030000000160009": "require"}),
        "p.yaml",
    )
    assert p.features[(cat.VENDOR_HYP_BMAP, 5)] is Mode.ALLOW
    assert p.features[(0x6030000000160009, None)] is Mode.REQUIRE
    assert p.mode_of(0x6030000000160009, 3) is Mode.REQUIRE


def test_yaml_hostile_forms(tmp_path: pytest.TempPathFactory) -> None:
    cases = {
        "alias": "a: &x [1]\nb: *x\n",
        "dup": "apiVersion: a\napiVersion: b\n",
        "tag": "!!python/object/apply:os.system ['true']\n",
        "nonstr": "1: 2\n",
        "binary": "\xff\xfe",
    }
    for name, text in cases.items():
        path = tmp_path / f"{name}.yaml"  # type: ignore[operator]
        path.write_bytes(
            text.encode("utf-8", errors="surrogateescape") if name != "binary" else b"\xff\xfe\x00"
        )
        with pytest.raises(InvalidInput) as err:
            load_policy_file(str(path))
        assert str(path) in str(err.value)


DOMAIN = """<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>web1</name><uuid>u-1</uuid>
  <metadata>{meta}</metadata>
  <qemu:commandline>
    <qemu:arg value='-qmp'/>
    <qemu:arg value='unix:/run/q/web1.qmp,server=on,wait=off'/>
  </qemu:commandline>
</domain>"""
NS = 'xmlns:hvc="https://hvcpolicy.dev/xmlns/libvirt/1"'


def test_domain_examples_parse() -> None:
    d = parse_domain((EXAMPLES / "domains" / "web1-applied-6.18.xml").read_text())
    assert d.name == "web1"
    assert d.meta is not None and d.meta.ref == "fleet-2026"
    assert d.meta.resume_after_apply
    assert d.meta.features == {(cat.VENDOR_HYP_BMAP, 1): Mode.DENY}
    assert d.qmp_socket == "/var/lib/libvirt/qemu/hvcpolicy/web1.qmp"
    assert d.meta.applied is not None
    assert d.meta.applied.registers[cat.VENDOR_HYP_BMAP_2] == 1
    plain = parse_domain((EXAMPLES / "domains" / "unannotated.xml").read_text())
    assert plain.meta is None


def test_qmp_socket_from_commandline() -> None:
    d = parse_domain(DOMAIN.format(meta=f'<hvc:policy {NS} ref="a"/>'))
    assert d.qmp_socket == "/run/q/web1.qmp"
    assert (
        qmp_from_args(
            ["-chardev", "socket,id=m,path=/x.sock,server=on", "-mon", "chardev=m,mode=control"]
        )
        == "/x.sock"
    )
    assert qmp_from_args(["-qmp", "tcp:1.2.3.4:5"]) is None


def test_render_round_trip() -> None:
    d = parse_domain((EXAMPLES / "domains" / "web1-applied-6.18.xml").read_text())
    assert d.meta is not None
    again = parse_domain(DOMAIN.format(meta=render_policy(d.meta)))
    assert again.meta == d.meta
    assert again.meta is not None and again.meta.applied == d.meta.applied


@pytest.mark.parametrize(
    ("meta", "needle"),
    [
        (f"<hvc:policy {NS}/>", "needs the attribute 'ref'"),
        (f'<hvc:policy {NS} ref="Bad Name"/>', "not a policy name"),
        (f'<hvc:policy {NS} ref="a"/><hvc:policy {NS} ref="b"/>', "more than one <hvc:policy>"),
        (f'<hvc:policy {NS} ref="a"><hvc:feature name="ptp" mode="x"/></hvc:policy>', "mode"),
        (
            f'<hvc:policy {NS} ref="a"><hvc:feature name="nope" mode="deny"/></hvc:policy>',
            "unknown feature",
        ),
        (
            f'<hvc:policy {NS} ref="a"><hvc:feature name="ptp" mode="deny"/>'
            '<hvc:feature name="ptp" mode="deny"/></hvc:policy>',
            "named twice",
        ),
        (f'<hvc:policy {NS} ref="a"><hvc:bogus/></hvc:policy>', "unknown element <hvc:bogus>"),
        (f'<hvc:policy {NS} ref="a"><hvc:psci version="2.9"/></hvc:policy>', "<hvc:psci"),
        (f'<hvc:policy {NS} ref="a"><hvc:qmp socket="rel.sock"/></hvc:policy>', "absolute"),
        (f'<hvc:policy {NS} ref="a"><hvc:resume after="boot"/></hvc:policy>', "resume"),
        (
            f'<hvc:policy {NS} ref="a"><hvc:unknown mode="x"/><hvc:unknown mode="deny"/>'
            "</hvc:policy>",
            "<hvc:unknown",
        ),
        (
            '<hvc:policy xmlns:hvc="https://hvcpolicy.dev/xmlns/libvirt/2" ref="a"/>',
            "unsupported hvcpolicy namespace",
        ),
        (
            f'<hvc:policy {NS} ref="a"><hvc:applied><hvc:register id="0x1" value="0x0"/>'
            "</hvc:applied></hvc:policy>",
            "not a firmware register id",
        ),
        (
            f'<hvc:policy {NS} ref="a"><hvc:applied><hvc:register id="0x6030000000160000" '
            'value="zz"/></hvc:applied></hvc:policy>',
            "value must be",
        ),
        (
            f'<hvc:policy {NS} ref="a"><hvc:applied><hvc:register id="0x6030000000160000" '
            'value="0x1"/><hvc:register id="0x6030000000160000" value="0x1"/></hvc:applied>'
            "</hvc:policy>",
            "listed twice",
        ),
        (
            f'<hvc:feature {NS} name="ptp" mode="deny"/>',
            "outside <hvc:policy>",
        ),
    ],
)
def test_bad_domain_metadata(meta: str, needle: str) -> None:
    with pytest.raises(InvalidInput) as err:
        parse_domain(DOMAIN.format(meta=meta), "dom.xml")
    assert needle in str(err.value)
    assert str(err.value).startswith("dom.xml: ")


@pytest.mark.parametrize(
    "xml",
    [
        '<?xml version="1.0"?><!DOCTYPE d [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;">]><domain/>',
        '<!DOCTYPE d SYSTEM "file:///etc/passwd"><domain/>',
        '<!DOCTYPE d [<!ENTITY x SYSTEM "file:///etc/passwd">]><domain><name>&x;</name></domain>',
        "<domain>" + "<a>" * 100 + "</a>" * 100 + "</domain>",
        "<domain><name>x</name>",
        "<notdomain/>",
        f'<domain><metadata><hvc:policy {NS} ref="{"a" * 10000}"/></metadata></domain>',
    ],
)
def test_hostile_xml_is_refused(xml: str) -> None:
    with pytest.raises(InvalidInput):
        parse_domain(xml, "evil.xml")


def test_merge_only_tightens() -> None:
    op = load_policy_file(str(POLICIES / "fleet-2026.yaml"))  # ptp allow, pv-time deny, psci 1.1

    def dom(meta: str) -> object:
        d = parse_domain(
            DOMAIN.format(meta=f'<hvc:policy {NS} ref="fleet-2026">{meta}</hvc:policy>')
        )
        assert d.meta is not None
        return d.meta

    m = merge(op, dom('<hvc:feature name="ptp" mode="deny"/><hvc:unknown mode="refuse"/>'), "d")  # type: ignore[arg-type]
    assert m.features[(cat.VENDOR_HYP_BMAP, 1)] is Mode.DENY
    assert m.unknown is Unknown.REFUSE
    assert (
        merge(op, dom('<hvc:feature name="trng" mode="require"/>'), "d").features[  # type: ignore[arg-type]
            (cat.STD_BMAP, 0)
        ]
        is Mode.REQUIRE
    )
    assert merge(op, dom('<hvc:psci version="1.1"/>'), "d").psci == 0x10001  # type: ignore[arg-type]
    for bad, needle in [
        ('<hvc:feature name="pv-time" mode="allow"/>', "pv-time"),
        ('<hvc:feature name="pv-time" mode="require"/>', "pv-time"),
        ('<hvc:feature name="kvm-features" mode="deny"/>', "kvm-features"),
        ('<hvc:feature name="discover-impl-ver" mode="allow"/>', "discover-impl-ver"),
        ('<hvc:unknown mode="allow"/>', "hvc:unknown"),
        ('<hvc:psci version="1.0"/>', "hvc:psci"),
    ]:
        with pytest.raises(InvalidInput, match=needle):
            merge(op, dom(bad), "d")  # type: ignore[arg-type]
