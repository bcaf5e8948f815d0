"""The KVM/arm64 firmware pseudo-registers and the feature names policies use.

Pure data, from reference/kvm-arm64-firmware-registers.md. Register ids are ints in the code and
``0x`` + 16 lowercase hex digits everywhere a person or a file sees them.
"""

from __future__ import annotations

import re
from enum import Enum

from hvcpolicy.record import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

KVM_REG_ARM64 = 0x6000000000000000
KVM_REG_SIZE_U64 = 0x0030000000000000
COPROC_FW = 0x0014
COPROC_FW_FEAT_BMAP = 0x0016
_COPROC_SHIFT = 16
_COPROC_MASK = 0xFFFF << _COPROC_SHIFT
U64_MAX = (1 << 64) - 1


class Kind(Enum):
    PSCI = "psci"
    WORKAROUND = "workaround"  # WA1 / WA3: levels 0 NOT_AVAIL, 1 AVAIL, 2 NOT_REQUIRED
    WORKAROUND2 = "workaround2"  # WA2: 0 NOT_AVAIL, 1 UNKNOWN, 2 AVAIL, 3 NOT_REQUIRED, bit 4
    BITMAP = "bitmap"
    UNKNOWN_FW = "unknown-fw"  # coproc 0x14 id the catalogue does not know
    UNKNOWN_BITMAP = "unknown-bitmap"  # coproc 0x16 id the catalogue does not know


class Register(Record):
    __slots__ = ("first_kernel", "id", "kind", "mask", "name", "policy_key", "reset")

    def __init__(
        self,
        name: str,
        id: int,
        kind: Kind,
        reset: int | None,  # reset value on a fresh VM; None where it is the host's level
        mask: int | None,  # supported mask (bitmaps only)
        first_kernel: tuple[int, int],
        policy_key: str | None = None,  # key under spec.workarounds, for mitigations
    ) -> None:
        self.name = name
        self.id = id
        self.kind = kind
        self.reset = reset
        self.mask = mask
        self.first_kernel = first_kernel
        self.policy_key = policy_key


def reg_id(coproc: int, index: int) -> int:
    return KVM_REG_ARM64 | KVM_REG_SIZE_U64 | (coproc << _COPROC_SHIFT) | index


PSCI_VERSION = reg_id(COPROC_FW, 0)
SMCCC_ARCH_WORKAROUND_1 = reg_id(COPROC_FW, 1)
SMCCC_ARCH_WORKAROUND_2 = reg_id(COPROC_FW, 2)
SMCCC_ARCH_WORKAROUND_3 = reg_id(COPROC_FW, 3)
STD_BMAP = reg_id(COPROC_FW_FEAT_BMAP, 0)
STD_HYP_BMAP = reg_id(COPROC_FW_FEAT_BMAP, 1)
VENDOR_HYP_BMAP = reg_id(COPROC_FW_FEAT_BMAP, 2)
VENDOR_HYP_BMAP_2 = reg_id(COPROC_FW_FEAT_BMAP, 3)

REGISTERS: dict[int, Register] = {
    r.id: r
    for r in (
        Register("PSCI_VERSION", PSCI_VERSION, Kind.PSCI, None, None, (4, 16)),
        Register(
            "SMCCC_ARCH_WORKAROUND_1",
            SMCCC_ARCH_WORKAROUND_1,
            Kind.WORKAROUND,
            None,
            None,
            (5, 3),
            "smccc-arch-workaround-1",
        ),
        Register(
            "SMCCC_ARCH_WORKAROUND_2",
            SMCCC_ARCH_WORKAROUND_2,
            Kind.WORKAROUND2,
            None,
            None,
            (5, 3),
            "smccc-arch-workaround-2",
        ),
        Register(
            "SMCCC_ARCH_WORKAROUND_3",
            SMCCC_ARCH_WORKAROUND_3,
            Kind.WORKAROUND,
            None,
            None,
            (5, 17),
            "smccc-arch-workaround-3",
        ),
        Register("STD_BMAP", STD_BMAP, Kind.BITMAP, 0x1, 0x1, (5, 19)),
        Register("STD_HYP_BMAP", STD_HYP_BMAP, Kind.BITMAP, 0x1, 0x1, (5, 19)),
        Register("VENDOR_HYP_BMAP", VENDOR_HYP_BMAP, Kind.BITMAP, 0x3, 0x3, (5, 19)),
        Register("VENDOR_HYP_BMAP_2", VENDOR_HYP_BMAP_2, Kind.BITMAP, 0x0, 0x3, (6, 15)),
    )
}

WORKAROUND_KEYS: dict[str, int] = {
    r.policy_key: r.id for r in REGISTERS.values() if r.policy_key is not None
}


class Feature(Record):
    __slots__ = ("bit", "name", "register")

    def __init__(self, name: str, register: int, bit: int) -> None:
        self.name = name
        self.register = register
        self.bit = bit


FEATURES: dict[str, Feature] = {
    f.name: f
    for f in (
        Feature("trng", STD_BMAP, 0),
        Feature("pv-time", STD_HYP_BMAP, 0),
        Feature("kvm-features", VENDOR_HYP_BMAP, 0),
        Feature("ptp", VENDOR_HYP_BMAP, 1),
        Feature("discover-impl-ver", VENDOR_HYP_BMAP_2, 0),
        Feature("discover-impl-cpus", VENDOR_HYP_BMAP_2, 1),
    )
}
_FEATURE_BY_BIT: dict[tuple[int, int], str] = {
    (f.register, f.bit): f.name for f in FEATURES.values()
}

# PSCI versions as KVM encodes them: (major << 16) | minor.
PSCI_0_1 = 0x1
PSCI_0_2 = 0x2
PSCI_1_0 = 0x10000
PSCI_1_1 = 0x10001
PSCI_1_2 = 0x10002
PSCI_1_3 = 0x10003
PSCI_VERSIONS_0_2_AND_LATER = (PSCI_0_2, PSCI_1_0, PSCI_1_1, PSCI_1_2, PSCI_1_3)


_PSCI_TEXT = re.compile(r"(0|[1-9][0-9]{0,4})\.(0|[1-9][0-9]{0,4})")
_HEX_TEXT = re.compile(r"0x[0-9a-fA-F]{1,16}")


def psci_parse(text: str) -> int | None:
    """Parse "1.1" -> 0x10001; None when not of the form MAJOR.MINOR."""
    m = _PSCI_TEXT.fullmatch(text)
    if m is None:
        return None
    major, minor = int(m[1]), int(m[2])
    if major > 0x7FFF or minor > 0xFFFF:
        return None
    return (major << 16) | minor


def psci_text(value: int) -> str:
    return f"{value >> 16}.{value & 0xFFFF}"


def coproc(rid: int) -> int:
    return (rid & _COPROC_MASK) >> _COPROC_SHIFT


def is_firmware_reg(rid: int) -> bool:
    """A KVM/arm64 u64 register of coproc 0x14 or 0x16: the ones hvcpolicy governs."""
    return (rid & ~(_COPROC_MASK | 0xFFFF)) == (KVM_REG_ARM64 | KVM_REG_SIZE_U64) and coproc(
        rid
    ) in (COPROC_FW, COPROC_FW_FEAT_BMAP)


def kind_of(rid: int) -> Kind:
    reg = REGISTERS.get(rid)
    if reg is not None:
        return reg.kind
    return Kind.UNKNOWN_BITMAP if coproc(rid) == COPROC_FW_FEAT_BMAP else Kind.UNKNOWN_FW


def is_bitmap(rid: int) -> bool:
    return coproc(rid) == COPROC_FW_FEAT_BMAP


def reg_name(rid: int) -> str:
    """``VENDOR_HYP_BMAP (0x6030000000160002)``, or the bare id for an unknown register."""
    reg = REGISTERS.get(rid)
    return f"{reg.name} ({fmt_id(rid)})" if reg else fmt_id(rid)


def fmt_id(rid: int) -> str:
    return f"0x{rid:016x}"


def fmt_value(value: int) -> str:
    return f"0x{value:x}"


def parse_hex(text: str) -> int | None:
    """A u64 written as ``0x`` hex; None when it is not one."""
    if not isinstance(text, str) or not _HEX_TEXT.fullmatch(text):
        return None
    return int(text, 16)


def parse_regid(text: str) -> int | None:
    """A firmware register id (coproc 0x14 or 0x16), else None."""
    value = parse_hex(text)
    if value is None or not is_firmware_reg(value):
        return None
    return value


def parse_register_map(
    pairs: Iterable[tuple[object, object]], where: str, ids: str, field: Callable[[str], str]
) -> dict[int, int]:
    """Register id -> value pairs as files write them (``0x`` hex strings) -> ints. Errors name
    ``ids`` for a bad id, else ``field(id)``: a bad value, or an id listed twice."""
    from hvcpolicy.errors import InvalidInput, bounded

    registers: dict[int, int] = {}
    for key, value in pairs:
        rid = parse_regid(key) if isinstance(key, str) else None
        if rid is None:
            raise InvalidInput(
                f"{ids}: {bounded(str(key), 40)!r} is not a firmware register id "
                "(0x + 16 hex digits, coproc 0x14 or 0x16)",
                where,
            )
        val = parse_hex(value) if isinstance(value, str) else None
        if val is None:
            raise InvalidInput(f"{field(fmt_id(rid))}: value must be a 0x-hex u64 string", where)
        if rid in registers:
            raise InvalidInput(f"{field(fmt_id(rid))}: listed twice", where)
        registers[rid] = val
    return registers


def bit_key(rid: int, bit: int) -> str:
    """The policy name of a bit: its feature name, else ``REGID:BIT``."""
    return _FEATURE_BY_BIT.get((rid, bit)) or f"{fmt_id(rid)}:{bit}"


def parse_feature_key(key: str) -> tuple[int, int] | None:
    """``ptp`` or ``0x6030000000160002:1`` -> (register, bit); None when it names nothing."""
    feature = FEATURES.get(key)
    if feature is not None:
        return feature.register, feature.bit
    rid_text, sep, bit_text = key.partition(":")
    if not sep or not bit_text.isdigit() or len(bit_text) > 2:
        return None
    rid = parse_regid(rid_text)
    bit = int(bit_text)
    if rid is None or not is_bitmap(rid) or bit > 63:
        return None
    return rid, bit


def bits(value: int) -> list[int]:
    return [b for b in range(64) if value >> b & 1]
