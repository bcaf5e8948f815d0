"""Hostile domain XML: DTDs, external entities, entity-expansion bombs, deep nesting, huge
attributes, wrong or duplicate namespaces, duplicate <hvc:policy>. Each is refused quickly, with
exit 4 from the CLI and a non-zero exit (1: libvirt fails the operation) from the hook, one line
on stderr, never reading a file the XML names.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from hvcpolicy import XMLNS
from hvcpolicy.domainxml import parse_domain
from hvcpolicy.errors import InvalidInput
from tests.hardening.fuzzlib import Figures, record
from tests.hardening.simthread import hvcpolicy, run_hook

HEAD = "<domain type='kvm'><name>evil</name><uuid>6c1b7a1e-3f0c-4c52-9a51-1f6b0e1e0666</uuid>"
POL = f"<hvc:policy xmlns:hvc='{XMLNS}' ref='fleet-2026'/>"


def doc(meta: str = POL, before: str = "", inner: str = "") -> bytes:
    return f"{before}{HEAD}<metadata>{meta}</metadata>{inner}</domain>".encode()


LAUGHS = (
    "<!DOCTYPE domain [<!ENTITY a 'aaaaaaaaaa'>"
    + "".join(f"<!ENTITY {chr(98 + i)} '{('&' + chr(97 + i) + ';') * 10}'>" for i in range(9))
    + "]>"
)

HOSTILE: dict[str, tuple[bytes, str]] = {
    "billion-laughs": (doc(before=LAUGHS, inner="<x>&j;</x>"), "DTDs"),
    "quadratic-blowup": (
        doc(
            before="<!DOCTYPE domain [<!ENTITY a '" + "x" * 50000 + "'>]>",
            inner="<x>" + "&a;" * 50000 + "</x>",
        ),
        "DTDs",
    ),
    "external-entity": (
        doc(
            before='<!DOCTYPE domain [<!ENTITY x SYSTEM "file:///etc/passwd">]>', inner="<x>&x;</x>"
        ),
        "DTDs",
    ),
    "external-parameter-entity": (
        doc(before='<!DOCTYPE domain [<!ENTITY % p SYSTEM "http://127.0.0.1:9/x.dtd"> %p;]>'),
        "DTDs",
    ),
    "external-dtd": (doc(before='<!DOCTYPE domain SYSTEM "file:///etc/passwd">'), "DTDs"),
    "undeclared-entity": (doc(inner="<x>&passwd;</x>"), "not well-formed"),
    "deep-nesting": (doc(inner="<a>" * 200_000 + "</a>" * 200_000), "nested deeper"),
    "deep-nesting-in-policy": (
        doc(meta=f"<hvc:policy xmlns:hvc='{XMLNS}' ref='x'>" + "<hvc:feature>" * 5000),
        "",
    ),
    "huge-attribute": (doc(inner="<a b='" + "x" * 6_000_000 + "'/>"), "longer than"),
    "huge-ref": (
        doc(meta=f"<hvc:policy xmlns:hvc='{XMLNS}' ref='{'a' * 100_000}'/>"),
        "longer than",
    ),
    "too-large": (doc(inner="<a>" + "x" * (9 << 20) + "</a>"), "larger than"),
    "wrong-namespace": (
        doc(meta="<hvc:policy xmlns:hvc='https://hvcpolicy.dev/xmlns/libvirt/2' ref='x'/>"),
        "unsupported hvcpolicy namespace",
    ),
    "duplicate-namespace-declaration": (
        doc(meta=f"<hvc:policy xmlns:hvc='{XMLNS}' xmlns:hvc='{XMLNS}' ref='x'/>"),
        "duplicate attribute",
    ),
    "duplicate-policy": (doc(meta=POL + POL), "more than one <hvc:policy>"),
    "duplicate-policy-other-prefix": (
        doc(meta=POL + f"<h:policy xmlns:h='{XMLNS}' ref='default'/>"),
        "more than one <hvc:policy>",
    ),
    "duplicate-applied": (
        doc(
            meta=f"<hvc:policy xmlns:hvc='{XMLNS}' ref='x'>"
            "<hvc:applied/><hvc:applied/></hvc:policy>"
        ),
        "more than one <hvc:applied>",
    ),
    "policy-outside-metadata": (doc(meta="", inner=POL), "child of the domain's <metadata>"),
    "duplicate-attribute": (
        doc(meta=f"<hvc:policy xmlns:hvc='{XMLNS}' ref='a' ref='b'/>"),
        "duplicate",
    ),
    "nul-character": (doc(meta=f"<hvc:policy xmlns:hvc='{XMLNS}' ref='a&#0;'/>"), "invalid"),
    "not-utf8": (doc().replace(b"evil", b"ev\xff\xfe"), "not well-formed"),
    "unknown-encoding": (doc(before="<?xml version='1.0' encoding='x-evil'?>"), "encoding"),
    "two-roots": (doc() + doc(), "junk after document element"),
    "no-domain": (b"<notadomain/>", "no <domain>"),
    "empty": (b"", "no element found"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_parser_refuses_quickly(case: str) -> None:
    data, fragment = HOSTILE[case]
    start = time.monotonic()
    with pytest.raises(InvalidInput) as err:
        parse_domain(data, "evil.xml")
    took = time.monotonic() - start
    assert took < 1.0, f"{case}: {took:.2f} s"
    text = str(err.value)
    assert "\n" not in text and len(text) < 500, text
    assert fragment in text, text
    assert "root:" not in text  # /etc/passwd was never read
    record("hostile-xml/parser", Figures(inputs=1, seconds=took))


def test_many_attributes_on_a_foreign_element_parse_quickly() -> None:
    data = doc(inner="<a " + " ".join(f"a{i}='1'" for i in range(100_000)) + "/>")
    start = time.monotonic()
    assert parse_domain(data, "x.xml").meta is not None
    assert time.monotonic() - start < 1.0


def test_xinclude_is_not_processed() -> None:
    """XInclude is not XML 1.0: an <xi:include> is an element like any other, never fetched."""
    data = doc(
        inner="<xi:include xmlns:xi='http://www.w3.org/2001/XInclude' href='/etc/passwd' "
        "parse='text'/>"
    )
    dom = parse_domain(data, "x.xml")
    assert dom.meta is not None and dom.meta.ref == "fleet-2026"


def test_cli_validate_exits_4_on_each(tmp_path: Path) -> None:
    """One process validates every hostile file: exit 4, one line per file, nothing else."""
    paths = []
    for case, (data, _) in sorted(HOSTILE.items()):
        if case in ("not-utf8", "unknown-encoding"):  # validate decodes to text first
            continue
        path = tmp_path / f"{case}.xml"
        path.write_bytes(data)
        paths.append(str(path))
    run = hvcpolicy("validate", *paths, timeout=60)
    assert run.rc == 4, run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == len(paths), run.stderr[:3000]
    for line, path in zip(sorted(lines), sorted(paths), strict=True):
        assert line.startswith(f"hvcpolicy: {path}: "), line
        assert len(line) < 600
    assert "Traceback" not in run.stderr and run.stdout == ""
    assert run.seconds < 15, run.seconds


@pytest.mark.parametrize(
    "case", ["billion-laughs", "external-entity", "deep-nesting", "too-large", "duplicate-policy"]
)
def test_cli_stdin_exits_4_quickly(case: str) -> None:
    run = hvcpolicy(
        "explain",
        "--domain-xml",
        "-",
        "--host",
        "examples/hosts/neoverse-n1_linux-6.18.json",
        stdin=HOSTILE[case][0],
    )
    assert run.rc == 4, run.stderr
    assert len(run.stderr.splitlines()) == 1 and "Traceback" not in run.stderr
    assert run.seconds < 5


@pytest.mark.parametrize("stage", ["prepare", "started", "migrate", "restore"])
@pytest.mark.parametrize(
    "case",
    ["billion-laughs", "external-entity", "deep-nesting", "duplicate-policy", "wrong-namespace"],
)
def test_hook_refuses_hostile_xml(stage: str, case: str, tmp_path: Path) -> None:
    conf = tmp_path / "hook.conf"
    conf.write_text(f"policy_dir = {tmp_path}/policies\nhost_snapshot = {tmp_path}/h.json\n")
    conf.chmod(0o644)
    run = run_hook(str(conf), ["evil", stage, "begin", "-"], HOSTILE[case][0])
    assert run.rc == 1, run.stderr
    assert run.stdout == ""  # migrate/restore: no replacement XML
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hvcpolicy: "), run.stderr
    assert "Traceback" not in run.stderr
    assert run.seconds < 5
    record("hostile-xml/hook", Figures(inputs=1, seconds=run.seconds))


def test_hook_reconnect_with_hostile_xml_still_exits_0(tmp_path: Path) -> None:
    conf = tmp_path / "hook.conf"
    conf.write_text(f"policy_dir = {tmp_path}/policies\n")
    conf.chmod(0o644)
    for data, _ in HOSTILE.values():
        run = run_hook(str(conf), ["evil", "reconnect", "begin", "-"], data)
        assert run.rc == 0 and run.stderr == "", run.stderr
