"""The offline commands as a user runs them: a real subprocess, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, FIXTURE_HOSTS, REPO

POLICIES = EXAMPLES / "policies"


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HVCPOLICY_POLICY_DIR": str(POLICIES)}
    return subprocess.run(
        [sys.executable, "-m", "hvcpolicy", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        input=stdin,
        timeout=60,
    )


BROKEN = sorted((EXAMPLES / "broken").iterdir())
EXPECTED_FIELD = {
    "applied-bad-register.xml": "<hvc:register id>",
    "bad-mode.yaml": "spec.features.ptp",
    "bad-psci.yaml": "spec.psci.version",
    "bad-regid-bit.yaml": "spec.features.0x6030000000160002:64",
    "bad-snapshot.json": "registers.0x6030000000160002",
    "duplicate-key.yaml": "duplicate key 'ptp'",
    "entity-expansion.xml": "DTDs and entity declarations",
    "misspelt-field.yaml": "'featurs' was unexpected",
    "name-mismatch.yaml": "metadata.name",
    "psci-register-as-feature.yaml": "spec.features.0x6030000000140000",
    "two-policies.xml": "more than one <hvc:policy>",
    "unknown-feature.yaml": "spec.features.trgn",
    "widens-policy.xml": "<hvc:feature name='pv-time' mode='allow'> widens",
}


def test_every_broken_example_has_an_expectation() -> None:
    assert sorted(p.name for p in BROKEN) == sorted(EXPECTED_FIELD)


@pytest.mark.parametrize("path", BROKEN, ids=[p.name for p in BROKEN])
def test_broken_examples_exit_4_with_one_line(path: Path) -> None:
    r = run("validate", str(path))
    assert r.returncode == 4, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert str(path) in lines[0]
    assert EXPECTED_FIELD[path.name] in lines[0]
    assert "Traceback" not in r.stderr


def test_good_examples_validate() -> None:
    r = run("validate", "examples/policies", "examples/domains", "examples/hosts", "examples/fleet")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("ok ") == 21


def test_validate_json_lists_every_problem() -> None:
    r = run("validate", "--format", "json", "examples/broken")
    assert r.returncode == 4
    doc = json.loads(r.stdout)
    assert len(doc) == len(BROKEN) and not any(d["ok"] for d in doc)


@pytest.mark.parametrize("fixture", sorted(FIXTURE_HOSTS.glob("*.json")), ids=lambda p: p.stem)
def test_explain_every_fixture(fixture: Path) -> None:
    r = run("explain", "--policy", "fleet-2026", "--host", str(fixture))
    assert "FEATURE" in r.stdout and "ptp" in r.stdout
    if "_linux-6." in fixture.name:
        assert r.returncode == 0, r.stdout + r.stderr
        assert "verdict: a start would be allowed" in r.stdout
    else:
        assert r.returncode == 3
        assert "requires kvm-features, but the host lacks register VENDOR_HYP_BMAP" in r.stdout
    j = run("explain", "--format", "json", "--policy", "fleet-2026", "--host", str(fixture))
    doc = json.loads(j.stdout)
    assert {f["feature"] for f in doc["features"]} >= {"trng", "pv-time", "ptp"}


def test_explain_domain_xml_from_stdin() -> None:
    xml = (EXAMPLES / "domains" / "web1.xml").read_text()
    r = run(
        "explain",
        "--domain-xml",
        "-",
        "--host",
        str(FIXTURE_HOSTS / "neoverse-n1_linux-6.1.json"),
        stdin=xml,
    )
    assert r.returncode == 0, r.stderr
    assert "ptp" in r.stdout and "fleet-2026" in r.stdout
    line = next(x for x in r.stdout.splitlines() if x.startswith("ptp "))
    assert line.endswith("no")  # the domain denies ptp


def test_baseline_command(tmp_path: Path) -> None:
    all_ = run("baseline", *map(str, sorted(FIXTURE_HOSTS.glob("*.json"))))
    assert json.loads(all_.stdout)["registers"] == {"0x6030000000140000": "0x10000"}
    out = tmp_path / "b.json"
    six = run("baseline", "-o", str(out), *map(str, sorted(FIXTURE_HOSTS.glob("*_linux-6.*"))))
    assert six.returncode == 0
    assert (
        json.loads(out.read_text())["registers"]
        == json.loads((FIXTURE_HOSTS / "neoverse-n1_linux-6.1.json").read_text())["registers"]
    )


@pytest.mark.parametrize(
    ("xml", "dest", "rc", "needle"),
    [
        (
            "web1-applied-6.18.xml",
            "hosts/neoverse-n1_linux-6.1.json",
            3,
            "VENDOR_HYP_BMAP_2 (0x6030000000160003) = 0x1",
        ),
        ("batch7-psci-1.3.xml", "hosts/neoverse-n1_linux-6.1.json", 3, "PSCI 1.3"),
        (
            "web1-applied-6.1.xml",
            "hosts/neoverse-n1_linux-6.18.json",
            0,
            "clears on arrival: VENDOR_HYP_BMAP_2",
        ),
        ("web1-applied-6.18-bmap2-zero.xml", "fleet/node-6-1-qemu-7.2.json", 3, "11.1"),
        ("web1-applied-6.18-bmap2-zero.xml", "fleet/node-6-1-qemu-11.1.json", 0, "accepts"),
    ],
)
def test_check_migration(xml: str, dest: str, rc: int, needle: str) -> None:
    r = run(
        "check-migration", "--domain-xml", f"examples/domains/{xml}", "--to", f"examples/{dest}"
    )
    assert r.returncode == rc, r.stdout + r.stderr
    assert needle in r.stdout
    if rc == 3:
        assert len(r.stderr.strip().splitlines()) == 1 and needle.split(" (")[0] in r.stderr


def test_matrix_groups_hosts() -> None:
    r = run(
        "matrix",
        "--format",
        "json",
        "--policy",
        "fleet-2026",
        *map(str, sorted(FIXTURE_HOSTS.glob("*.json"))),
    )
    assert r.returncode == 0
    doc = json.loads(r.stdout)
    assert len(doc["classes"]) == 4  # the two CPUs share each kernel's registers
    starts = {c["kernel"][:4]: c["start"]["ok"] for c in doc["classes"]}
    assert starts == {"4.14": False, "5.10": False, "6.1.": True, "6.18": True}


@pytest.mark.parametrize(
    ("args", "rc"),
    [
        (["explain", "--host", "x.json"], 2),
        (["frobnicate"], 2),
        (["explain", "--policy", "nope", "--host", "examples/hosts/neoverse-n1_linux-6.1.json"], 4),
        (["explain", "--policy", "fleet-2026", "--host", "/nonexistent.json"], 4),
        (["baseline"], 2),
    ],
)
def test_usage_and_input_errors(args: list[str], rc: int) -> None:
    r = run(*args)
    assert r.returncode == rc, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr


def test_unannotated_domain_without_default_is_left_alone(tmp_path: Path) -> None:
    env_dir = tmp_path / "empty"
    env_dir.mkdir()
    r = run("--version")
    assert r.returncode == 0
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "hvcpolicy",
            "explain",
            "--policy-dir",
            str(env_dir),
            "--domain-xml",
            "examples/domains/unannotated.xml",
            "--host",
            "examples/hosts/neoverse-n1_linux-6.1.json",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert r.returncode == 0 and "leaves this domain alone" in r.stdout
