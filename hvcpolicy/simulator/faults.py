"""Fault injection: ``--fault NAME[@COMMAND[#N]][=VALUE]``.

``@COMMAND`` limits a fault to one QMP command (default: every command, ``qmp_capabilities``
included); ``#N`` to the N-th such command the process receives (1-based, counted over all
connections). ``=VALUE`` is the fault's parameter. Several ``--fault`` options combine.

Adding a fault: add a :class:`FaultKind` to :data:`KINDS` and act on it where the server
consults :meth:`Faults.for_command` (per command), :meth:`Faults.has` (global switches) or
:meth:`Faults.value` (parameters).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from hvcpolicy.errors import InvalidInput, bounded


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 3600:
        raise ValueError("expected 0..3600 seconds")
    return value


def _count(text: str) -> int:
    value = int(text, 0)
    if not 0 <= value <= 1 << 40:
        raise ValueError("out of range")
    return value


def _error_class(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]{0,63}", text):
        raise ValueError("expected an error class such as GenericError")
    return text


@dataclass(frozen=True, slots=True)
class FaultKind:
    name: str
    help: str
    per_command: bool  # takes @COMMAND[#N]
    value: Callable[[str], object] | None = None  # parser for =VALUE; None: takes none
    value_required: bool = False


KINDS: dict[str, FaultKind] = {
    k.name: k
    for k in (
        # issue 3
        FaultKind("no-greeting", "accept connections but never send the QMP greeting", False),
        FaultKind(
            "one-client",
            "one connection at a time, as a QEMU monitor: a later one is greeted when it goes",
            False,
        ),
        FaultKind("bad-greeting", "greet with a JSON object that is not a QMP greeting", False),
        FaultKind("hang", "never answer the command (nor anything after it)", True),
        FaultKind("drop", "write half the reply, then close the connection", True),
        FaultKind("error", "refuse the command (=CLASS, default GenericError)", True, _error_class),
        FaultKind(
            "slow", "delay the reply (and, without @, the greeting) =SECONDS", True, _seconds, True
        ),
        FaultKind("no-interface", "vCPUs lack the kvm-firmware-registers property", False),
        FaultKind(
            "partial-write",
            "qom-set of the registers writes N (=N, default half) of them, then fails with EIO",
            False,
            _count,
        ),
        # issue 7
        FaultKind("malformed", "answer with text that is not JSON", True),
        FaultKind("truncated", "answer with the first half of the reply and a newline", True),
        FaultKind("oversized", "pad the reply to =BYTES (default 16 MiB)", True, _count),
        FaultKind("wrong-id", "answer with an id the client did not send", True),
        FaultKind("stray-reply", "send a reply nobody asked for before the real one", True),
        FaultKind("reorder", "hold the reply until after the next command's reply (<= 1 s)", True),
        FaultKind(
            "vcpu-disagree",
            "after a write, vCPU =INDEX (default the last) keeps reading the old values",
            False,
            _count,
        ),
        FaultKind(
            "resume",
            "just before the command, another monitor resumes the vCPUs (RESUME; with "
            "--upstream a real cont)",
            True,
        ),
        FaultKind(
            "exit",
            "exit before answering, as a QEMU that dies mid-apply (the socket file stays)",
            True,
        ),
    )
}

_SPEC = re.compile(r"^([a-z][a-z-]*)(?:@([A-Za-z0-9_-]{1,64})(?:#([0-9]{1,9}))?)?(?:=(.{1,64}))?$")


@dataclass(slots=True)
class Fault:
    kind: str
    command: str | None = None
    nth: int | None = None
    value: object = None
    seen: int = field(default=0, compare=False)

    def hit(self, command: str) -> bool:
        """Count this command; True when the fault applies to it."""
        if self.command is not None and command != self.command:
            return False
        self.seen += 1
        return self.nth is None or self.seen == self.nth

    def __str__(self) -> str:
        text = self.kind
        if self.command:
            text += f"@{self.command}"
            if self.nth:
                text += f"#{self.nth}"
        if self.value is not None:
            text += f"={self.value}"
        return text


def parse_fault(text: str) -> Fault:
    m = _SPEC.match(text)
    if m is None:
        raise InvalidInput(f"--fault {bounded(text)!r}: expected NAME[@COMMAND[#N]][=VALUE]")
    name, command, nth, raw = m.groups()
    kind = KINDS.get(name)
    if kind is None:
        raise InvalidInput(
            f"--fault {bounded(text)!r}: unknown fault {name!r} (known: {', '.join(KINDS)})"
        )
    if command is not None and not kind.per_command:
        raise InvalidInput(f"--fault {bounded(text)!r}: {name} applies to no single command")
    if nth is not None and int(nth) < 1:
        raise InvalidInput(f"--fault {bounded(text)!r}: #N counts from 1")
    value: object = None
    if raw is not None:
        if kind.value is None:
            raise InvalidInput(f"--fault {bounded(text)!r}: {name} takes no value")
        try:
            value = kind.value(raw)
        except ValueError as err:
            raise InvalidInput(f"--fault {bounded(text)!r}: bad value: {err}") from None
    elif kind.value_required:
        raise InvalidInput(f"--fault {bounded(text)!r}: {name} needs =VALUE")
    return Fault(name, command, int(nth) if nth else None, value)


class Faults:
    """The faults one simulator runs with."""

    def __init__(self, faults: list[Fault] | None = None) -> None:
        self.faults = list(faults or [])

    @classmethod
    def parse(cls, specs: list[str] | None) -> Faults:
        return cls([parse_fault(s) for s in specs or []])

    def has(self, kind: str) -> bool:
        return any(f.kind == kind for f in self.faults)

    def value(self, kind: str) -> object:
        """The value of the first fault of that kind (None when absent or without value)."""
        return next((f.value for f in self.faults if f.kind == kind), None)

    def global_slow(self) -> float:
        return sum(
            f.value
            for f in self.faults
            if f.kind == "slow" and f.command is None and isinstance(f.value, float)
        )

    def for_command(self, command: str) -> dict[str, Fault]:
        """The per-command faults that apply to this occurrence of ``command``, by kind."""
        hits: dict[str, Fault] = {}
        for fault in self.faults:
            if KINDS[fault.kind].per_command and fault.hit(command):
                hits.setdefault(fault.kind, fault)
        return hits
