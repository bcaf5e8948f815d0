"""One audit line per decision, to syslog (ident ``hvcpolicy``) and optionally to a file.

Stdlib only and cheap to import: the libvirt hook calls this on every stage it handles. A line is
``key=value`` pairs in a fixed order; values that came from outside are bounded and quoted when
they hold spaces, so a line can always be split back.
"""

from __future__ import annotations

import os
import time

from hvcpolicy.errors import bounded

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

_FIELDS = ("domain", "uuid", "stage", "policy", "outcome", "before", "after", "reason")


def regs_text(registers: Mapping[int, int] | None) -> str:
    """Registers as ``id=value,...`` (sorted), ``-`` when unknown."""
    if not registers:
        return "-"
    return ",".join(f"0x{rid:016x}=0x{value:x}" for rid, value in sorted(registers.items()))


def _value(text: str) -> str:
    text = bounded(text, 1500)
    if not text or any(c in text for c in ' "='):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def line(fields: Mapping[str, str]) -> str:
    keys = [k for k in _FIELDS if k in fields] + sorted(k for k in fields if k not in _FIELDS)
    return " ".join(f"{k}={_value(fields[k])}" for k in keys)


def record(fields: Mapping[str, str], audit_file: str | None = None, warning: bool = False) -> str:
    """Log one decision; never raises (an audit failure must not change the decision)."""
    # argv may carry surrogate escapes (a name that is not UTF-8): syslog and the file would
    # raise UnicodeEncodeError on them, so such bytes are written as \udcXX escapes.
    text = line(fields).encode("utf-8", "backslashreplace").decode("utf-8")
    try:
        import syslog

        syslog.openlog("hvcpolicy", syslog.LOG_PID, syslog.LOG_DAEMON)
        syslog.syslog(syslog.LOG_WARNING if warning else syslog.LOG_INFO, text)
        syslog.closelog()
    except OSError:
        pass
    if audit_file:
        try:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            fd = os.open(audit_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            try:
                os.write(fd, f"{stamp} hvcpolicy[{os.getpid()}]: {text}\n".encode())
            finally:
                os.close(fd)
        except OSError:
            pass
    return text
