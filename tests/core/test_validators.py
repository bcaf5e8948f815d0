"""The small text validators, each in the module that owns the format: what they accept and what
they refuse, at the edges (a trailing newline, one digit too many, a missing part)."""

from __future__ import annotations

import pytest

from hvcpolicy.catalogue import parse_hex, psci_parse
from hvcpolicy.domainxml import qmp_from_args
from hvcpolicy.errors import InvalidInput
from hvcpolicy.kernel import parse_version
from hvcpolicy.policy import is_policy_name
from hvcpolicy.snapshot import parse_snapshot, qemu_version


@pytest.mark.parametrize(
    "text,want",
    [("0x0", 0), ("0xFFFFffffFFFFffff", 2**64 - 1), ("0x" + "f" * 17, None), ("0x", None),
     ("0x0\n", None), ("0X1", None), (" 0x1", None), ("0x\u0661", None), ("0xg", None)],
)  # fmt: skip
def test_parse_hex(text: str, want: int | None) -> None:
    assert parse_hex(text) == want


@pytest.mark.parametrize(
    "text,want",
    [("1.1", 0x10001), ("0.2", 0x2), ("1.3", 0x10003), ("1.1\n", None), ("01.1", None),
     ("1.01", None), ("100000.0", None), ("1.", None), ("1.1.1", None), ("\u0661.\u0662", None)],
)  # fmt: skip
def test_psci_parse(text: str, want: int | None) -> None:
    assert psci_parse(text) == want


@pytest.mark.parametrize(
    "text,want",
    [("fleet-2026", True), ("a", True), ("a" * 63, True), ("a" * 64, False),
     ("fleet-2026\n", False), ("-a", False), ("a-", False), ("A", False), ("é", False),
     ("", False), ("a--b", True)],
)  # fmt: skip
def test_is_policy_name(text: str, want: bool) -> None:
    assert is_policy_name(text) is want


@pytest.mark.parametrize(
    "text,want",
    [("6.1.172-216.329.amzn2023.aarch64", (6, 1)), ("6.18", (6, 18)), ("6", None), ("6.", None),
     ("6.x", None), ("\u0666.1", None)],
)  # fmt: skip
def test_parse_version(text: str, want: tuple[int, int] | None) -> None:
    assert parse_version(text) == want


@pytest.mark.parametrize(
    "text,want",
    [("7.2.0", (7, 2, 0)), ("8.2", (8, 2, 0)), ("7.2.0-rc1", (7, 2, 0)), ("10.0.3", (10, 0, 3)),
     ("8.2.", (8, 2, 0)), ("x7.2", None), ("7", None)],
)  # fmt: skip
def test_qemu_version(text: str, want: tuple[int, int, int] | None) -> None:
    assert qemu_version(text) == want


@pytest.mark.parametrize(
    "taken,ok",
    [("2026-11-24T23:00:00Z", True), ("2026-11-24T23:00:00.5Z", True),
     ("2026-11-24T23:00:00+01:00", True), ("2026-11-24T23:00:00Z\n", False),
     ("2026-11-24T23:00:00.Z", False), ("2026-11-24T23:00:00+0100", False),
     ("2026-11-24 23:00:00Z", False), ("2026-11-24T23:00:00", False)],
)  # fmt: skip
def test_snapshot_taken(taken: str, ok: bool) -> None:
    doc = {
        "apiVersion": "hvcpolicy/v1", "kind": "HostSnapshot", "host": "h", "kernel": "6.1",
        "source": "kvm", "taken": taken, "registers": {},
    }  # fmt: skip
    if ok:
        assert parse_snapshot(doc, "t").host == "h"
    else:
        with pytest.raises(InvalidInput, match="taken"):
            parse_snapshot(doc, "t")


@pytest.mark.parametrize(
    "value,want",
    [("unix:/a", "/a"), ("unix:/a,server=on", "/a"), ("unix:", None), ("unix:,x", None),
     ("tcp:1", None)],
)  # fmt: skip
def test_qmp_unix(value: str, want: str | None) -> None:
    assert qmp_from_args(["-qmp", value]) == want
