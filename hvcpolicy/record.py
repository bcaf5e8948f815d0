"""Plain value classes for the core, without ``dataclasses``.

The libvirt hook imports the core on every start and migration; ``dataclasses`` (through
``inspect``) and ``typing`` cost more than the interpreter's own start-up, so the core uses these
slotted records instead and imports typing names for the type checker only.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Self


class Record:
    """Equality, hashing, repr and ``replace`` over the fields named in ``__slots__``."""

    __slots__ = ()

    def _names(self) -> tuple[str, ...]:
        names: tuple[str, ...] = type(self).__slots__
        return names

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self._names())

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Record)
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in self._names())
        return f"{type(self).__name__}({fields})"

    def replace(self, **changes: object) -> Self:
        new = object.__new__(type(self))
        for name in self._names():
            object.__setattr__(new, name, changes.pop(name, getattr(self, name)))
        if changes:
            raise TypeError(f"{type(self).__name__} has no field {next(iter(changes))!r}")
        return new
