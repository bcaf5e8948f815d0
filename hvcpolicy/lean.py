"""What the hook's path needs from ``enum``, ``re`` and ``json``, without importing them.

libvirt runs the hook on every start, restore and migration. ``enum`` (through ``functools`` and
``collections``), ``re`` (which imports ``enum``) and ``json`` (whose decoder and encoder import
``re`` and compile patterns at import) together cost more than the interpreter's own start-up
(bench/, docs/PERFORMANCE.md). The core's few uses of them are small, so they are written out
here, behaving exactly as the originals do (tests/bench/test_lean.py holds each one to the
original on edge cases and random input):

- ``Enum``: string-valued enumerations: members by attribute, ``Cls(value)``, iteration in
  definition order, ``.name``/``.value``, identity comparison, the same repr and str. The type
  checker sees ``enum.Enum`` itself.
- the matchers: each is one compiled pattern of the core (named in its docstring), as a function
  that answers what ``pattern.match(text)`` would: None, or the groups.
- ``json_loads``: ``json.loads`` through the C scanner ``json`` itself uses; on anything but a
  clean document it calls ``json.loads``, so errors (and their messages) are json's own.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Any


# --- enumerations -------------------------------------------------------------------------------


class _EnumType(type):
    """The metaclass: turns each public class attribute into a member."""

    _member_map_: dict[str, Any]
    _value2member_map_: dict[Any, Any]

    def __new__(mcs, name: str, bases: tuple[type, ...], ns: dict[str, Any]) -> _EnumType:
        values = {
            k: v
            for k, v in ns.items()
            if not k.startswith("_") and not callable(v) and not isinstance(v, property)
        }
        body = {k: v for k, v in ns.items() if k not in values}
        cls = super().__new__(mcs, name, bases, body)
        cls._member_map_ = {}
        cls._value2member_map_ = {}
        make: Any = object.__new__
        for key, value in values.items():
            if value in cls._value2member_map_:  # an alias, as enum.Enum makes it
                member = cls._value2member_map_[value]
            else:
                member = make(cls)
                member._name_ = key
                member._value_ = value
                cls._value2member_map_[value] = member
            cls._member_map_[key] = member
            type.__setattr__(cls, key, member)
        return cls

    def __call__(cls, value: Any) -> Any:
        if isinstance(value, cls):
            return value
        try:
            return cls._value2member_map_[value]
        except (KeyError, TypeError):
            raise ValueError(f"{value!r} is not a valid {cls.__qualname__}") from None

    def __iter__(cls) -> Iterator[Any]:
        return iter(list(dict.fromkeys(cls._member_map_.values())))

    def __len__(cls) -> int:
        return len(cls._value2member_map_)

    def __contains__(cls, member: object) -> bool:
        return isinstance(member, cls) and member._name_ in cls._member_map_

    def __getitem__(cls, name: str) -> Any:
        return cls._member_map_[name]

    def __setattr__(cls, name: str, value: object) -> None:
        if name in cls.__dict__.get("_member_map_", {}):
            raise AttributeError(f"cannot reassign member {name!r}")
        super().__setattr__(name, value)

    def __repr__(cls) -> str:
        return f"<enum {cls.__name__!r}>"


class Enum(metaclass=_EnumType):
    """Base of the core's enumerations (see the module docstring)."""

    __slots__ = ("_name_", "_value_")
    _name_: str
    _value_: Any

    @property
    def name(self) -> str:
        return self._name_

    @property
    def value(self) -> Any:
        return self._value_

    def __repr__(self) -> str:
        return f"<{type(self).__name__}.{self._name_}: {self._value_!r}>"

    def __str__(self) -> str:
        return f"{type(self).__name__}.{self._name_}"

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    def __hash__(self) -> int:
        return hash(self._name_)

    def __reduce_ex__(self, proto: object) -> tuple[Any, tuple[Any]]:
        return type(self), (self._value_,)

    def __copy__(self) -> Any:
        return self

    def __deepcopy__(self, memo: object) -> Any:
        return self


# --- the core's patterns, as functions ----------------------------------------------------------

_HEXDIGITS = frozenset("0123456789abcdefABCDEF")
_ASCII_DIGITS = frozenset("0123456789")
_NAME_FIRST = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")
_NAME_INNER = _NAME_FIRST | {"-"}


def _strip_final_newline(text: str) -> str:
    """``$`` (no MULTILINE) matches at the end and also just before a final newline."""
    return text[:-1] if text.endswith("\n") else text


def match_hex(text: str) -> bool:
    """``re.match(r"^0x[0-9a-fA-F]{1,16}$", text)`` is not None."""
    body = _strip_final_newline(text)
    return (
        body.startswith("0x")
        and 1 <= len(body) - 2 <= 16
        and all(c in _HEXDIGITS for c in body[2:])
    )


def _small_number(text: str) -> bool:
    """``0|[1-9][0-9]{0,4}`` over the whole of ``text``."""
    if text == "0":
        return True
    return (
        1 <= len(text) <= 5
        and text[0] in _ASCII_DIGITS
        and text[0] != "0"
        and all(c in _ASCII_DIGITS for c in text)
    )


def match_psci(text: str) -> tuple[str, str] | None:
    """``re.match(r"^(0|[1-9][0-9]{0,4})\\.(0|[1-9][0-9]{0,4})$", text)``: the two groups."""
    major, dot, minor = _strip_final_newline(text).partition(".")
    if dot and _small_number(major) and _small_number(minor):
        return major, minor
    return None


def match_name(text: str) -> bool:
    """``re.match(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\\Z", text)`` is not None."""
    return (
        1 <= len(text) <= 63
        and text[0] in _NAME_FIRST
        and text[-1] in _NAME_FIRST
        and all(c in _NAME_INNER for c in text)
    )


def _leading_digits(text: str, start: int) -> int:
    """The end of the run of ``\\d`` (Unicode decimal digits) from ``start``."""
    end = start
    while end < len(text) and text[end].isdecimal():
        end += 1
    return end


def match_version(text: str) -> tuple[str, str] | None:
    """``re.match(r"^(\\d+)\\.(\\d+)", text)``: the two groups."""
    a = _leading_digits(text, 0)
    if a == 0 or a >= len(text) or text[a] != ".":
        return None
    b = _leading_digits(text, a + 1)
    if b == a + 1:
        return None
    return text[:a], text[a + 1 : b]


def match_qemu_version(text: str) -> tuple[str, str, str | None] | None:
    """``re.match(r"^(\\d+)\\.(\\d+)(?:\\.(\\d+))?", text)``: the three groups."""
    first = match_version(text)
    if first is None:
        return None
    end = len(first[0]) + 1 + len(first[1])
    if end < len(text) and text[end] == ".":
        c = _leading_digits(text, end + 1)
        if c > end + 1:
            return first[0], first[1], text[end + 1 : c]
    return first[0], first[1], None


def _digits(text: str, start: int, count: int) -> bool:
    stop = start + count
    return stop <= len(text) and all(c.isdecimal() for c in text[start:stop])


def match_taken(text: str) -> bool:
    r"""``re.match(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$", text)``
    is not None."""
    s = text
    if not (
        _digits(s, 0, 4)
        and s[4:5] == "-"
        and _digits(s, 5, 2)
        and s[7:8] == "-"
        and _digits(s, 8, 2)
        and s[10:11] == "T"
        and _digits(s, 11, 2)
        and s[13:14] == ":"
        and _digits(s, 14, 2)
        and s[16:17] == ":"
        and _digits(s, 17, 2)
    ):
        return False
    i = 19
    if s[i : i + 1] == ".":
        j = _leading_digits(s, i + 1)
        if j == i + 1:
            return False
        i = j
    rest = _strip_final_newline(s[i:])
    if rest == "Z":
        return True
    return (
        len(rest) == 6
        and rest[0] in "+-"
        and _digits(rest, 1, 2)
        and rest[3] == ":"
        and _digits(rest, 4, 2)
    )


def match_qmp_unix(text: str) -> str | None:
    """``re.match(r"^unix:([^,]+)", text)``: the group."""
    if not text.startswith("unix:"):
        return None
    path = text[5:].split(",", 1)[0]
    return path or None


# --- JSON ---------------------------------------------------------------------------------------


class _ScanContext:
    """What ``_json.make_scanner`` reads from a ``json.JSONDecoder``, with json's defaults."""

    strict = True
    object_hook = None
    parse_float = float
    parse_int = int

    def __init__(self, object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None) -> None:
        self.object_pairs_hook = object_pairs_hook
        self.parse_constant = {
            "-Infinity": float("-inf"),
            "Infinity": float("inf"),
            "NaN": float("nan"),
        }.__getitem__


_JSON_SPACE = " \t\n\r"


def json_loads(
    data: bytes | str, object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None
) -> Any:
    """``json.loads(data, object_pairs_hook=...)``; see the module docstring."""
    try:
        from _json import make_scanner
    except ImportError:  # no C accelerator: json itself
        return _json_slow(data, object_pairs_hook)
    if isinstance(data, bytes):
        # json.loads decodes UTF-8 (no BOM, no NUL in the first bytes) with surrogatepass
        if data.startswith(b"\xef\xbb\xbf") or b"\x00" in data[:4]:
            return _json_slow(data, object_pairs_hook)
        try:
            text = data.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            return _json_slow(data, object_pairs_hook)
    elif isinstance(data, str):
        text = data
    else:
        return _json_slow(data, object_pairs_hook)
    if text.startswith("\ufeff"):
        return _json_slow(data, object_pairs_hook)
    n = len(text)
    start = 0
    while start < n and text[start] in _JSON_SPACE:
        start += 1
    try:
        context: Any = _ScanContext(object_pairs_hook)
        value, end = make_scanner(context)(text, start)
    except RecursionError:
        raise
    except Exception:  # StopIteration, a JSONDecodeError, a hook's error: json's own answer
        return _json_slow(data, object_pairs_hook)
    while end < n and text[end] in _JSON_SPACE:
        end += 1
    if end != n:  # extra data
        return _json_slow(data, object_pairs_hook)
    return value


def _json_slow(
    data: bytes | str, object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None
) -> Any:
    import json

    return json.loads(data, object_pairs_hook=object_pairs_hook)


def _not_serializable(o: object) -> Any:
    raise TypeError(f"Object of type {o.__class__.__name__} is not JSON serializable")


def json_dumps(value: Any) -> str:
    """``json.dumps(value)`` with json's defaults, through json's own C encoder; on any error
    (or without the accelerator), ``json.dumps`` itself, so errors are json's."""
    try:
        from _json import encode_basestring_ascii, make_encoder
    except ImportError:
        return _json_dumps_slow(value)
    if isinstance(value, str):
        return str(encode_basestring_ascii(value))
    try:
        encode = make_encoder(
            {}, _not_serializable, encode_basestring_ascii, None, ": ", ", ", False, False, True
        )
        return "".join(encode(value, 0))
    except Exception:
        return _json_dumps_slow(value)


def _json_dumps_slow(value: Any) -> str:
    import json

    return json.dumps(value)
