"""What libvirt runs: ``main(argv, stdin)``, DOMAIN OP SUBOP EXTRA and the domain XML; one stage,
every error one audit line and one message on stderr (SPEC.md section 7)."""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # run as a file under -I -S: put the package's directory on sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from hvcpolicy.errors import HvcError, Refused
from hvcpolicy.hook.config import load_config
from hvcpolicy.hook.context import Hook

TYPE_CHECKING = False  # typing costs more than the interpreter's start-up: checker-only names
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import IO

    from hvcpolicy.hook.config import Config

HANDLED = ("prepare", "started", "migrate", "restore", "reconnect")  # stages.STAGES' keys

_MAX_XML = 8 << 20  # domainxml.MAX_XML, without importing it before the stage needs it


def main(argv: list[str], stdin: IO[bytes]) -> int:
    """``argv``: DOMAIN OP SUBOP EXTRA as libvirt passes them; ``stdin``: the domain XML (its
    head already read by the sh pre-filter, in ``HVC_XML_HEAD``)."""
    if len(argv) < 2 or argv[1] not in HANDLED:
        return 0
    head = os.environ.pop("HVC_XML_HEAD", "").encode("utf-8", "surrogateescape")
    rc, message = run(argv, _read_xml(head, stdin), load_config)
    if message:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
    return rc


def leave(rc: int) -> None:
    """What ``hooks/qemu`` runs after :func:`main`: exit without the interpreter's teardown.
    Everything the hook writes is closed or flushed by then (the audit line, stderr, the QMP
    connection); unloading asyncio and qemu.qmp alone costs a QMP stage ~8 ms, with libvirt
    holding the domain's lock."""
    try:
        sys.stderr.flush()
        sys.stdout.flush()
    except OSError:  # libvirt closed our output: what could be said was said
        rc = rc or 1
    os._exit(rc)


def _read_xml(head: bytes, stdin: IO[bytes]) -> bytes:
    try:
        # at most one byte past the limit: parse_domain refuses it, the rest is never read
        return head + stdin.read(max(0, _MAX_XML + 1 - len(head)))
    except OSError:
        return head


def run(argv: list[str], xml: bytes, config: Callable[[], Config]) -> tuple[int, str]:
    """One stage, every error one audit line and one message; -> (exit status, message)."""
    stage = argv[1]
    hook: Hook | None = None
    try:
        from hvcpolicy.hook.stages import STAGES

        conf = config()
        from hvcpolicy.startlock import steps_aside

        # `hvcpolicy start` (or the hook's child) drives this start or its own restore: the
        # sh pre-filter steps aside the same way, without Python, when it can
        if steps_aside(conf.run_dir, argv[0], stage):
            return 0, ""
        hook = Hook(argv, xml, conf)
        return STAGES[stage](hook), ""
    except HvcError as err:
        outcome = "refused" if isinstance(err, Refused) else "error"
        return _fail(hook, stage, outcome, err.message)
    except Exception as err:  # a bug: still one line, and fail closed except on reconnect
        return _fail(hook, stage, "error", f"internal error: {type(err).__name__}: {err}")


def _fail(hook: Hook | None, stage: str, outcome: str, message: str) -> tuple[int, str]:
    if not message.startswith("hvcpolicy: "):
        message = "hvcpolicy: " + message
    if hook is not None:
        hook.log(outcome, warning=True, reason=message)
    else:
        from hvcpolicy import audit

        audit.record({"stage": stage, "outcome": outcome, "reason": message}, None, True)
    if stage == "reconnect":
        return 0, ""
    return 1, message


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], sys.stdin.buffer))
