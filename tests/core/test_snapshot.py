"""Snapshots: the fixtures, the schema against the hand-written checks, atomic saves."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hvcpolicy import catalogue as cat
from hvcpolicy.errors import InvalidInput
from hvcpolicy.policy import schema_problems
from hvcpolicy.snapshot import baseline, load_snapshot, parse_snapshot, save_snapshot
from tests.conftest import EXAMPLES, FIXTURE_HOSTS, REPO

FIXTURES = sorted(FIXTURE_HOSTS.glob("*.json"))


def test_bundled_hosts_equal_the_shared_fixtures() -> None:
    for path in FIXTURES:
        assert (EXAMPLES / "hosts" / path.name).read_bytes() == path.read_bytes()


def test_schemas_ship_inside_the_package() -> None:
    assert (REPO / "schemas").resolve() == (REPO / "hvcpolicy" / "schemas").resolve()
    from importlib import resources

    names = {p.name for p in resources.files("hvcpolicy").joinpath("schemas").iterdir()}
    assert {"policy.schema.json", "snapshot.schema.json"} <= names


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_fixtures_load_and_pass_the_schema(path: Path) -> None:
    doc = json.loads(path.read_text())
    assert schema_problems(doc, "snapshot") == []
    snap = load_snapshot(str(path))
    assert snap.to_json() == doc


def test_baseline_of_all_fixtures_is_the_4_14_set() -> None:
    low = baseline(load_snapshot(str(p)) for p in FIXTURES)
    assert (
        low.registers == load_snapshot(str(FIXTURE_HOSTS / "neoverse-n1_linux-4.14.json")).registers
    )
    assert low.kernel.startswith("4.14")


def test_baseline_of_6_x_is_the_6_1_set() -> None:
    low = baseline(load_snapshot(str(p)) for p in FIXTURES if "_linux-6." in p.name)
    assert (
        low.registers == load_snapshot(str(FIXTURE_HOSTS / "neoverse-n1_linux-6.1.json")).registers
    )
    assert cat.VENDOR_HYP_BMAP_2 not in low.registers


BAD = [
    ({"registers": {"0x6030000000150000": "0x1"}}, "not a firmware register id"),
    ({"registers": {"0x6030000000160000": "1"}}, "0x-hex"),
    ({"registers": {"0x6030000000160000": "0x10000000000000000"}}, "0x-hex"),
    ({"source": "guess"}, "source"),
    ({"taken": "yesterday"}, "taken"),
    ({"qemu": "latest"}, "qemu"),
    ({"extra": 1}, "unknown field"),
    ({"host": ""}, "host"),
]


@pytest.mark.parametrize(("change", "needle"), BAD)
def test_bad_snapshots_agree_with_the_schema(change: dict[str, object], needle: str) -> None:
    doc = json.loads((FIXTURE_HOSTS / "neoverse-n1_linux-6.1.json").read_text())
    doc.update(change)
    with pytest.raises(InvalidInput, match=needle):
        parse_snapshot(doc, "s.json")
    assert schema_problems(doc, "snapshot") != []


def test_save_is_atomic_and_round_trips(tmp_path: Path) -> None:
    snap = load_snapshot(str(FIXTURES[0]))
    target = tmp_path / "sub" / "host.json"
    save_snapshot(snap, str(target))
    assert load_snapshot(str(target)) == snap
    assert os.listdir(target.parent) == ["host.json"]  # no temporary left behind
