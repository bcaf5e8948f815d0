"""hvcpolicy's metrics read back over HTTP from a real ``prometheus-node-exporter``: the textfile
collector refuses a malformed file (``node_textfile_scrape_error 1``), so every scrape here also
checks the format. A host with a domain in every state (real libvirtd, the status tests'
harness), bad input that still exports, and many scrapes during many writes."""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hvcpolicy import catalogue as cat
from hvcpolicy import libvirt
from hvcpolicy.domainxml import parse_domain, render_policy
from hvcpolicy.libvirt_status import DRIFT, MATCH, Row
from hvcpolicy.metrics import STATES, HostFacts, exposition
from tests.conftest import REPO
from tests.libvirt.conftest import SYSTEM_QMP_DIR, SYSTEM_URI, Lab, domain_xml, virsh
from tests.metrics.nodeexporter import NodeExporter, Sample, value


def textfile_dir(tmp_path: Path) -> Path:
    d = tmp_path / "textfile"
    d.mkdir(mode=0o755)
    return d


def hvcpolicy(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hvcpolicy", *args],
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        cwd="/",
        capture_output=True,
        text=True,
        timeout=120,
    )


def hvc_samples(samples: list[Sample]) -> list[Sample]:
    return [s for s in samples if s[0].startswith("hvcpolicy_")]


# --- bad input never breaks the export ------------------------------------------------------


def test_unreachable_libvirt_and_bad_files_still_export(tmp_path: Path) -> None:
    out = textfile_dir(tmp_path)
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "fleet-2026.yaml").write_bytes(
        (REPO / "examples" / "policies" / "fleet-2026.yaml").read_bytes()
    )
    (policies / "broken.json").write_text('{"apiVersion": "hvcpolicy/v1", "kind": "Nope"}')
    snap = tmp_path / "host.json"
    snap.write_text("{not json")
    done = hvcpolicy(
        "status", "--format", "prometheus",
        "--connect", "qemu+unix:///system?socket=/nonexistent/libvirt-sock",
        "--policy-dir", str(policies),
        "--output", str(out / "hvcpolicy.prom"),
        env={"HVCPOLICY_HOST_SNAPSHOT": str(snap)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "libvirt" in done.stderr and str(snap) in done.stderr  # said, one line each
    assert "Traceback" not in done.stderr
    assert [p.name for p in out.iterdir()] == ["hvcpolicy.prom"]  # no temporary file left
    with NodeExporter(out) as ne:
        samples = ne.samples()
    assert value(samples, "node_textfile_scrape_error") == 0
    assert value(samples, "hvcpolicy_libvirt_up") == 0
    assert value(samples, "hvcpolicy_host_snapshot_state", state="invalid") == 1
    assert value(samples, "hvcpolicy_host_snapshot_state", state="ok") == 0
    assert value(samples, "hvcpolicy_policies") == 2
    assert value(samples, "hvcpolicy_policy_valid", policy="broken") == 0
    assert value(samples, "hvcpolicy_policy_valid", policy="fleet-2026") == 1
    assert value(samples, "hvcpolicy_domain_state") is None


def test_output_must_be_a_prom_file_the_collector_reads(tmp_path: Path) -> None:
    done = hvcpolicy(
        "status", "--format", "prometheus", "--connect", "qemu+unix:///system?socket=/none",
        "--output", str(tmp_path / "hvcpolicy.txt"), env={},
    )  # fmt: skip
    assert done.returncode == 4 and "*.prom" in done.stderr
    done = hvcpolicy("status", "--output", str(tmp_path / "x.prom"), env={})
    assert done.returncode == 2 and "--format prometheus" in done.stderr


# --- concurrency: the timer writes while node_exporter reads -----------------------------------


def _texts(tmp_path: Path) -> tuple[Path, Path]:
    host = HostFacts("h", "k", 0.0)
    big = [
        Row(f"guest-{i:05d}", f"u{i}", i, "running", "fleet", "domain", None, live)
        for i, live in enumerate([MATCH, DRIFT, MATCH] * 1000)
    ]
    small = [Row("only", "u", 1, "running", "fleet", "domain", None, DRIFT)]
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(exposition(big, host, [], {("prepare", "refused"): 5}))
    b.write_text(exposition(small, host, [], {("prepare", "refused"): 6}))
    return a, b


WRITER = """
import sys, time
from hvcpolicy.exporter import write_atomic
a, b, path, n, naive = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1"
texts = [open(a).read(), open(b).read()]
for i in range(n):
    text = texts[i % 2]
    if naive:  # what a shell redirect does: truncate, then write as it goes
        with open(path, "w") as f:
            for j in range(0, len(text), 65536):
                f.write(text[j:j + 65536]); f.flush(); time.sleep(0.002)
    else:
        write_atomic(path, text)
"""


def _scrape_during_writes(tmp_path: Path, naive: bool, writes: int) -> collections.Counter[str]:
    """Scrape node_exporter as fast as it answers while a writer replaces the file ``writes``
    times, alternating a 3000-domain and a 1-domain exposition. -> what each scrape saw."""
    out = textfile_dir(tmp_path)
    a, b = _texts(tmp_path)
    path = out / "hvcpolicy.prom"
    path.write_text(a.read_text())
    seen: collections.Counter[str] = collections.Counter()
    with NodeExporter(out) as ne:
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(a), str(b), str(path), str(writes),
             "1" if naive else "0"],
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        try:
            while writer.poll() is None or seen.total() < 50:
                samples = ne.samples()
                error = value(samples, "node_textfile_scrape_error")
                domains = [s for s in samples if s[0] == "hvcpolicy_domain_state"]
                refused = value(samples, "hvcpolicy_decisions_total", outcome="refused")
                if error == 0 and len(domains) == 3000 and refused == 5:
                    seen["big"] += 1
                elif error == 0 and len(domains) == 1 and refused == 6:
                    seen["small"] += 1
                else:
                    seen[f"partial (error={error}, {len(domains)} domains)"] += 1
        finally:
            writer.wait(120)
        assert writer.returncode == 0
    return seen


def test_many_scrapes_during_many_writes_never_see_a_partial_set(tmp_path: Path) -> None:
    seen = _scrape_during_writes(tmp_path, naive=False, writes=1500)
    assert set(seen) <= {"big", "small"}, seen
    assert seen["big"] > 0 and seen["small"] > 0, seen  # the writes did happen under the scrapes
    assert seen.total() >= 50


def test_the_check_catches_a_writer_that_is_not_atomic(tmp_path: Path) -> None:
    """The control: the same scrapes during a truncate-and-write writer do see torn files."""
    seen = _scrape_during_writes(tmp_path, naive=True, writes=40)
    assert any(k.startswith("partial") for k in seen), seen


# --- a real host: a domain in every state -----------------------------------------------------


def _edit_live(name: str, change: Callable[[Any], Any]) -> None:
    """Replace a running domain's live <hvc:policy> with ``change(meta)``."""
    conn = libvirt.connect(SYSTEM_URI)
    try:
        dom = libvirt.lookup(conn, name)
        meta = parse_domain(libvirt.domain_xml(dom), name).meta
        assert meta is not None
        libvirt.set_policy_metadata(dom, render_policy(change(meta)), live=True)
    finally:
        conn.close()


def _audit_counts(lab: Lab) -> collections.Counter[tuple[str, str]]:
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    for line in lab.audit():
        stage = re.search(r" stage=(\S+)", line)
        outcome = re.search(r" outcome=(\S+)", line)
        assert stage and outcome, line
        counts[(stage.group(1), outcome.group(1))] += 1
    return counts


def test_every_state_read_back_from_node_exporter(
    lab: Lab, guest_factory: Any, tmp_path: Path
) -> None:
    lab.write_policy(
        "status-warn", {"unknown": "allow", "enforcement": {"unsupported-qemu": "warn"}}
    )
    broken = lab.policies / "broken-policy.json"
    broken.write_text('{"apiVersion": "hvcpolicy/v1", "kind": "FirmwarePolicy"}')
    broken.chmod(0o644)
    names: dict[str, str] = {}
    try:
        _host_with_every_state(lab, guest_factory, names)
        out = textfile_dir(tmp_path)
        done = lab.hvcpolicy(
            "status", "--connect", SYSTEM_URI, "--format", "prometheus",
            "--output", str(out / "hvcpolicy.prom"), check=False, timeout=180,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        with NodeExporter(out) as ne:
            samples = ne.samples()
    finally:
        broken.unlink()
        if "no-interface" in names:
            virsh(SYSTEM_URI, "destroy", names["no-interface"], check=False, timeout=30)
            virsh(SYSTEM_URI, "undefine", names["no-interface"], check=False, timeout=30)

    assert value(samples, "node_textfile_scrape_error") == 0
    assert value(samples, "hvcpolicy_libvirt_up") == 1
    by_name = {lab_["domain"]: lab_ for n, lab_, _ in samples if n == "hvcpolicy_domain_state"}
    for state, name in names.items():
        labels = by_name[name]
        assert labels["state"] == state, (name, labels)
    m = by_name[names["match"]]
    assert (m["policy"], m["policy_source"], m["applied"]) == ("web", "domain", "true")
    # `hvcpolicy start` over the QMP interface; a record from before <hvc:applied backend>
    # says nothing, which is "unknown"
    assert m["backend"] in ("qmp", "unknown")
    assert by_name[names["unmanaged"]]["policy"] == ""
    assert by_name[names["not-running"]]["backend"] == "none"
    assert by_name[names["no-interface"]]["policy"] == "status-warn"
    for state in STATES:  # every state seen at least once
        n = value(samples, "hvcpolicy_domains", state=state)
        assert n is not None and n >= 1, state
    assert value(samples, "hvcpolicy_host_info", host=os.uname().nodename) == 1
    assert value(samples, "hvcpolicy_host_snapshot_state", state="ok") == 1
    current = value(samples, "hvcpolicy_host_snapshot_current")  # the fixture's kernel, not ours
    assert current == (1 if os.uname().release == "6.18.30-61.116.amzn2023.aarch64" else 0)
    assert value(samples, "hvcpolicy_policy_valid", policy="broken-policy") == 0
    assert value(samples, "hvcpolicy_policy_valid", policy="web") == 1
    # the hook's and start's decisions: the counters say what the audit log says
    decisions = {
        (lab_["stage"], lab_["outcome"]): v
        for n, lab_, v in samples
        if n == "hvcpolicy_decisions_total"
    }
    assert decisions == dict(_audit_counts(lab))
    assert decisions[("prepare", "refused")] >= 1
    assert decisions[("prepare", "allowed")] >= 3


def _host_with_every_state(lab: Lab, guest_factory: Any, names: dict[str, str]) -> None:
    """Fill ``names``: state -> the domain in that state."""
    for state in ("match", "drift", "unreachable"):
        g = guest_factory("web")
        lab.hvcpolicy("start", g.name, "--connect", SYSTEM_URI, timeout=180)
        names[state] = g.name
    # drift: the record says VENDOR_HYP_BMAP 0x3, the vCPUs read 0x1
    _edit_live(
        names["drift"],
        lambda meta: meta.replace(
            applied=meta.applied.replace(
                registers={**meta.applied.registers, cat.VENDOR_HYP_BMAP: 0x3}
            )
        ),
    )
    # unreachable: QEMU lacks the interface and the <hvc:qmp> socket answers no one
    _edit_live(names["unreachable"], lambda meta: meta.replace(qmp_socket="/nonexistent/x.qmp"))
    unmanaged = guest_factory(None)  # no metadata and no default policy
    virsh(SYSTEM_URI, "start", unmanaged.name)
    names["unmanaged"] = unmanaged.name
    names["not-running"] = guest_factory(None).name
    # no-interface: a real QEMU, read through libvirt's pass-through, and no <hvc:qmp> (not
    # from the factory: its simulator would take the QEMU's only QMP connection)
    noif = f"{names['match']}-noif"  # hvct-*: undefined by the daemon fixture at the latest
    xml = domain_xml(noif, "status-warn", f"{SYSTEM_QMP_DIR}/{noif}.qmp", "/nonexistent")
    path = lab.root / f"{noif}.xml"
    path.write_text(re.sub(r"<hvc:qmp [^>]*/>", "", xml))
    virsh(SYSTEM_URI, "define", str(path))
    virsh(SYSTEM_URI, "start", noif)
    names["no-interface"] = noif
    # invalid: its metadata names a policy that does not exist; its name needs escaping
    bad = guest_factory("web", define=False)
    xml = lab.root / f"{bad.name}.xml"
    text = xml.read_text().replace('ref="web"', 'ref="no-such-policy"')
    escaped = bad.name + '-q"b\\s'
    xml.write_text(text.replace(f"<name>{bad.name}</name>", f"<name>{escaped}</name>"))
    virsh(SYSTEM_URI, "define", str(xml))
    bad.name = escaped  # undefined by the factory under this name
    names["invalid"] = escaped
    # a refusal the hook counts: this host lacks what the policy requires
    refused = guest_factory("needs-future")
    assert virsh(SYSTEM_URI, "start", refused.name, check=False).returncode != 0
