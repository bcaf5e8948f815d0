"""hvcpolicy/lean.py stands in for enum, re and json on the hook's path (a performance change):
each stand-in answers exactly what the original does, on edge cases and on random input."""

from __future__ import annotations

import copy
import enum
import json
import pickle
import re
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvcpolicy import lean
from hvcpolicy.catalogue import Kind
from hvcpolicy.kernel import Errno
from hvcpolicy.policy import Mode, Unknown

# (stand-in, the core's original pattern, what the stand-in answers: a bool, the groups, group 1)
PATTERNS: list[tuple[Callable[[str], Any], str, str]] = [
    (lean.match_hex, r"^0x[0-9a-fA-F]{1,16}$", "bool"),
    (lean.match_psci, r"^(0|[1-9][0-9]{0,4})\.(0|[1-9][0-9]{0,4})$", "groups"),
    (lean.match_name, r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z", "bool"),
    (lean.match_version, r"^(\d+)\.(\d+)", "groups"),
    (lean.match_qemu_version, r"^(\d+)\.(\d+)(?:\.(\d+))?", "groups"),
    (lean.match_taken, r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$", "bool"),
    (lean.match_qmp_unix, r"^unix:([^,]+)", "group1"),
]

EDGES = [
    "", "\n", "0x", "0x0", "0x0\n", "0x0\n\n", "0X1", "0x" + "f" * 16, "0x" + "f" * 17,
    "0xg", " 0x1", "0x1 ", "0x\u0661", "0.0", "1.1", "1.1\n", "01.1", "1.01", "65535.0",
    "99999.99999", "100000.0", "1.", ".1", "1..1", "1.1.1", "\u0661.\u0662", "6.1.172-216",
    "6.18", "6", "6.", "6.x", "10.0.3", "11.1", "7.2.0-rc1", "8.2.", "a", "a-", "-a", "a--b",
    "fleet-2026", "fleet-2026\n", "a" * 63, "a" * 64, "A", "é", "2026-11-24T23:00:00Z",
    "2026-11-24T23:00:00Z\n", "2026-11-24T23:00:00.5Z", "2026-11-24T23:00:00.Z",
    "2026-11-24T23:00:00+01:00", "2026-11-24T23:00:00-01:00\n", "2026-11-24T23:00:00+0100",
    "2026-11-24 23:00:00Z", "2026-11-24T23:00:00", "2026-11-24T23:00:00ZZ",
    "\u0662026-11-24T23:00:00Z", "unix:", "unix:/a", "unix:/a,server=on", "unix:,x", "unix:\n,",
    "tcp:1", "unix:/a\nb,c",
]  # fmt: skip

ALPHABET = st.sampled_from(list("0123456789abcdefxX.-:+TZ,\n unix\u0661\u0966é"))
TEXT = st.one_of(st.text(ALPHABET, max_size=40), st.text(max_size=12))


def _original(pattern: str, answer: str, text: str) -> Any:
    m = re.match(pattern, text)
    if answer == "bool":
        return m is not None
    if m is None:
        return None
    return m.groups() if answer == "groups" else m.group(1)


@pytest.mark.parametrize("fn,pattern,answer", PATTERNS, ids=[p[1] for p in PATTERNS])
def test_matchers_agree_with_the_patterns_on_edge_cases(
    fn: Callable[[str], Any], pattern: str, answer: str
) -> None:
    for text in EDGES:
        assert fn(text) == _original(pattern, answer, text), text


@settings(max_examples=3000, deadline=None)
@given(TEXT)
def test_matchers_agree_with_the_patterns_on_random_text(text: str) -> None:
    for fn, pattern, answer in PATTERNS:
        assert fn(text) == _original(pattern, answer, text), (pattern, text)


JSON_DOCS = [
    b'{"a": 1, "b": [1, 2.5, -3e2, true, false, null], "c": {"d": "\\u00e9\\ud83d\\ude00"}}',
    b"  [1, 2]\n\t", b"{}", b"[]", b"1", b'"x"', b"NaN", b"[Infinity, -Infinity]",
    b"", b" ", b"{", b'{"a": 1} x', b'{"a": 1}{}', b'{"a": 1,}', b"[1,]", b"\xef\xbb\xbf{}",
    "{}".encode("utf-16"), b'{"a": "\xff"}', b'{"a": "\x01"}', b'{"a": 1, "a": 2}',
    b"[" * 100000 + b"]" * 100000, b'{"a": "\\ud800"}', b"0123", b"-", b"1e", b"tru",
]  # fmt: skip


def _reject(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _outcome(fn: Callable[..., Any], data: bytes | str, hook: Any) -> tuple[str, str]:
    try:
        return "ok", json.dumps(fn(data, object_pairs_hook=hook), sort_keys=True)
    except (ValueError, RecursionError, UnicodeDecodeError, TypeError) as err:
        return type(err).__name__, str(err)


@pytest.mark.parametrize("hook", [None, _reject])
def test_json_loads_is_json_loads(hook: Any) -> None:
    for doc in JSON_DOCS:
        for data in (doc, doc.decode("utf-8", "replace")):
            want = _outcome(json.loads, data, hook)
            assert _outcome(lean.json_loads, data, hook) == want, doc


@settings(max_examples=500, deadline=None)
@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=5), c, max_size=4),
    max_leaves=20,
))  # fmt: skip
def test_json_loads_round_trips(value: Any) -> None:
    text = json.dumps(value)
    assert lean.json_dumps(value) == text
    assert lean.json_loads(text) == json.loads(text)
    assert lean.json_loads(text.encode()) == json.loads(text.encode())


def test_json_dumps_is_json_dumps() -> None:
    cycle: list[object] = []
    cycle.append(cycle)
    for value in (
        "é\u2028\x00", {"execute": "qom-set", "arguments": {"value": {"0x1": 3}}}, [1.5, None],
        float("nan"), [float("inf")], {1: 2, False: 3, None: 4, 1.5: 5}, {(1,): 2}, object(),
        cycle, 2**70, -0.0,
    ):  # fmt: skip
        try:
            want: tuple[str, str] = ("ok", json.dumps(value))
        except (TypeError, ValueError) as err:
            want = (type(err).__name__, str(err))
        try:
            got: tuple[str, str] = ("ok", lean.json_dumps(value))
        except (TypeError, ValueError) as err:
            got = (type(err).__name__, str(err))
        assert got == want, value


class RealMode(enum.Enum):
    ALLOW = "allow"
    DENY = "deny"
    REQUIRE = "require"


def test_enum_behaves_as_enum() -> None:
    assert [m.name for m in Mode] == [m.name for m in RealMode]
    assert [m.value for m in Mode] == [m.value for m in RealMode]
    assert len(Mode) == len(RealMode) == 3
    assert Mode("deny") is Mode.DENY and Mode(Mode.DENY) is Mode.DENY
    assert Mode["REQUIRE"] is Mode.REQUIRE
    assert repr(Mode.ALLOW) == repr(RealMode.ALLOW).replace("RealMode", "Mode")
    assert str(Mode.ALLOW) == "Mode.ALLOW" and f"{Mode.ALLOW}" == "Mode.ALLOW"
    assert hash(Mode.ALLOW) == hash(RealMode.ALLOW)
    assert Mode.ALLOW in Mode and Unknown.ALLOW not in Mode
    assert Mode.ALLOW != Unknown.ALLOW and Mode.ALLOW != "allow"
    assert isinstance(Mode.ALLOW, Mode) and not isinstance(Unknown.DENY, Mode)
    assert copy.copy(Mode.DENY) is Mode.DENY and copy.deepcopy(Mode.DENY) is Mode.DENY
    assert pickle.loads(pickle.dumps(Mode.DENY)) is Mode.DENY
    for bad in ("nope", None, ["allow"]):
        with pytest.raises(ValueError) as real:
            RealMode(bad)
        with pytest.raises(ValueError) as ours:
            Mode(bad)
        assert str(ours.value) == str(real.value).replace("RealMode", "Mode")
    with pytest.raises(AttributeError):
        Mode.ALLOW = Mode.DENY  # type: ignore[misc]
    assert {k.value for k in Kind} >= {"psci", "bitmap"} and Errno("EINVAL") is Errno.EINVAL
