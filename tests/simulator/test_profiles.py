"""Kernel profiles against the real host dumps and the reference's version table."""

from __future__ import annotations

import json

import pytest

from hvcpolicy.catalogue import (
    PSCI_VERSION,
    SMCCC_ARCH_WORKAROUND_1,
    SMCCC_ARCH_WORKAROUND_2,
    SMCCC_ARCH_WORKAROUND_3,
    STD_BMAP,
    VENDOR_HYP_BMAP,
    VENDOR_HYP_BMAP_2,
)
from hvcpolicy.errors import InvalidInput
from hvcpolicy.simulator.profiles import PROFILE_NAMES, parse_release, profile_for
from tests.conftest import FIXTURE_HOSTS

FIXTURES = sorted(FIXTURE_HOSTS.glob("*.json"))


def test_fixtures_are_there() -> None:
    assert len(FIXTURES) == 8


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_fresh_values_equal_the_real_dump(path: object) -> None:
    snap = json.loads(path.read_text())  # type: ignore[attr-defined]
    profile = profile_for(snap["kernel"])
    fresh = {f"0x{rid:016x}": f"0x{v:x}" for rid, v in profile.fresh_values().items()}
    assert fresh == snap["registers"]
    assert list(profile.registers) == sorted(profile.registers)


@pytest.mark.parametrize(
    ("release", "expected"),
    [
        ("6.1", (6, 1)),
        ("6.18.30-61.116.amzn2023.aarch64", (6, 18)),
        ("6.1.0-18-arm64", (6, 1)),
        ("7", (7, 0)),
        ("7.3.1+deb13-arm64", (7, 3)),
        ("4.14.336-257.568.amzn2.aarch64", (4, 14)),
    ],
)
def test_parse_release(release: str, expected: tuple[int, int]) -> None:
    assert parse_release(release) == expected


@pytest.mark.parametrize("release", ["", "linux-6.1", "six", "6x1", "3.10.0", "4.9.337"])
def test_bad_or_too_old_release_is_invalid_input(release: str) -> None:
    with pytest.raises(InvalidInput):
        profile_for(release)


def test_named_profiles() -> None:
    assert PROFILE_NAMES == ("4.14", "5.10", "6.1", "6.12", "6.18", "7.3")
    p612, p61 = profile_for("6.12"), profile_for("6.1")
    assert p612.registers == p61.registers and p612.psci_newest == 0x10001
    p73, p618 = profile_for("7.3"), profile_for("6.18")
    assert p73.registers == p618.registers and p73.psci_newest == p618.psci_newest == 0x10003
    assert p73.name == "7.3" and p73.release == "7.3"


@pytest.mark.parametrize(
    ("release", "newest", "accepted"),
    [
        ("4.14", 0x10000, (0x2, 0x10000)),
        ("5.17", 0x10000, (0x2, 0x10000)),
        ("5.18", 0x10001, (0x2, 0x10000, 0x10001)),
        ("6.12", 0x10001, (0x2, 0x10000, 0x10001)),
        ("6.13", 0x10003, (0x2, 0x10000, 0x10001, 0x10002, 0x10003)),
    ],
)
def test_psci_by_kernel(release: str, newest: int, accepted: tuple[int, ...]) -> None:
    profile = profile_for(release)
    assert profile.psci_newest == newest
    assert profile.psci_accepted == accepted


@pytest.mark.parametrize(
    ("release", "present", "absent"),
    [
        ("5.2", [PSCI_VERSION], [SMCCC_ARCH_WORKAROUND_1]),
        ("5.3", [SMCCC_ARCH_WORKAROUND_1, SMCCC_ARCH_WORKAROUND_2], [SMCCC_ARCH_WORKAROUND_3]),
        ("5.18", [SMCCC_ARCH_WORKAROUND_3], [STD_BMAP]),
        ("5.19", [STD_BMAP, VENDOR_HYP_BMAP], [VENDOR_HYP_BMAP_2]),
        ("6.14", [VENDOR_HYP_BMAP], [VENDOR_HYP_BMAP_2]),
        ("6.15", [VENDOR_HYP_BMAP_2], [0x6030000000140004]),
        ("9.9", [VENDOR_HYP_BMAP_2], [0x6030000000140004]),
    ],
)
def test_first_kernels(release: str, present: list[int], absent: list[int]) -> None:
    profile = profile_for(release)
    assert all(profile.lists(r) for r in present)
    assert not any(profile.lists(r) for r in absent)


def test_mitigation_levels_default_and_override() -> None:
    assert profile_for("6.1").wa_levels == {
        SMCCC_ARCH_WORKAROUND_1: 2,
        SMCCC_ARCH_WORKAROUND_2: 0,
        SMCCC_ARCH_WORKAROUND_3: 1,
    }
    custom = profile_for("6.1", {SMCCC_ARCH_WORKAROUND_2: 3, SMCCC_ARCH_WORKAROUND_3: 2})
    assert custom.fresh_values()[SMCCC_ARCH_WORKAROUND_2] == 3
    assert custom.fresh_values()[SMCCC_ARCH_WORKAROUND_3] == 2
    assert profile_for("4.14").wa_levels == {}
    with pytest.raises(InvalidInput):
        profile_for("6.1", {SMCCC_ARCH_WORKAROUND_1: 3})
    with pytest.raises(InvalidInput):
        profile_for("6.1", {STD_BMAP: 1})
