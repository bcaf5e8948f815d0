"""Every exception hvcpolicy raises on purpose, and the exit code each maps to.

    HvcError                  exit 1  a bug, if it ever escapes uncaught
    ├── UsageError            exit 2  bad command line
    ├── Refused               exit 3  the policy says no (start, migration, write)
    ├── InvalidInput          exit 4  a file, XML or field is malformed or means nothing
    └── Unavailable           exit 5  QEMU, libvirt or the host unreachable or lacking an interface
        ├── QMPError          ... a QMP exchange failed; carries what was sent and what came back
        │   └── QMPTimeout    ... a bounded wait ran out
        ├── InterfaceMissing  ... QEMU has no kvm-firmware-registers property
        └── KVMUnavailable    ... no arm64 KVM on this host

Messages are one line and name the file, field, register or feature at fault.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3
EXIT_INVALID = 4
EXIT_UNAVAILABLE = 5

# Messages never echo unbounded input (hostile XML, huge values).
_MAX_MESSAGE = 2000


def bounded(text: str, limit: int = 200) -> str:
    """Quote-safe, length-bounded rendering of a value that came from outside."""
    text = text.replace("\n", "\\n").replace("\r", "\\r")
    if len(text) > limit:
        return text[:limit] + f"...({len(text)} chars)"
    return text


class HvcError(Exception):
    """Base of all hvcpolicy errors. ``str(err)`` is the one-line message users see."""

    exit_code: int = EXIT_INTERNAL

    def __init__(self, message: str) -> None:
        message = " ".join(message.split("\n"))
        if len(message) > _MAX_MESSAGE:
            message = message[:_MAX_MESSAGE] + "..."
        super().__init__(message)
        self.message = message


class UsageError(HvcError):
    exit_code = EXIT_USAGE


class Refused(HvcError):
    """The policy refuses; ``reasons`` lists every reason (the message joins them)."""

    exit_code = EXIT_REFUSED

    def __init__(self, message: str, reasons: list[str] | None = None) -> None:
        super().__init__(message)
        self.reasons = reasons if reasons is not None else [message]


class InvalidInput(HvcError):
    """Malformed or meaningless input. ``where`` is the file (and field) at fault."""

    exit_code = EXIT_INVALID

    def __init__(self, message: str, where: str | None = None) -> None:
        super().__init__(f"{where}: {message}" if where else message)
        self.where = where
        self.problems: list[str] = [self.message]


class Unavailable(HvcError):
    exit_code = EXIT_UNAVAILABLE


class QMPError(Unavailable):
    """A QMP exchange failed. ``sent`` and ``received`` keep the context for -v and logs."""

    def __init__(
        self,
        message: str,
        sent: object | None = None,
        received: object | None = None,
        error_class: str | None = None,
    ) -> None:
        super().__init__(message)
        self.sent = sent
        self.received = received
        self.error_class = error_class


class QMPTimeout(QMPError):
    pass


class InterfaceMissing(Unavailable):
    pass


class KVMUnavailable(Unavailable):
    pass
