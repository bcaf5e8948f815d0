"""The detached recorder: once libvirt's start job ends, it records ``<hvc:applied>`` in the
live XML and, with ``<hvc:resume after="apply"/>``, resumes the guest. It is a child the hook
forks and leaves: it may call libvirt (through ``virsh``), the hook never does."""

from __future__ import annotations

import os

from hvcpolicy.errors import HvcError

TYPE_CHECKING = False  # typing costs more than the interpreter's start-up: checker-only names
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from hvcpolicy.hook.context import Hook
    from hvcpolicy.snapshot import Snapshot


def hook_element(hook: Hook, registers: Mapping[int, int]) -> str:
    meta = hook.domain.meta
    assert meta is not None
    try:
        snap: Snapshot | None = hook.snapshot()
    except HvcError:
        snap = None
    from hvcpolicy.domainxml import applied_element

    return applied_element(meta, registers, snap)


def spawn_recorder(hook: Hook, element: str, resume: bool) -> None:
    """Fork a detached child (:func:`detached`) that, once libvirt's start job ends, records
    ``element`` in the live XML and, when asked, resumes."""
    detached(lambda: _record_and_resume(hook, element, resume))


def detached(work: Callable[[], int]) -> None:
    """Run ``work`` in a fully detached child (setsid, fds 0-2 on /dev/null, nothing else open)
    and return at once. The child may call libvirt: it is no longer inside the hook, so it
    simply waits for libvirt's job on the domain to end."""
    if os.fork():
        return  # the hook exits right after: the child is reparented, no zombie is left
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.closerange(3, 65536)  # the QMP socket above all: QEMU serves one client at a time
        rc = work()
    except BaseException:
        rc = 1
    os._exit(rc)


def libvirt_uri() -> str:
    return "qemu:///system" if os.getuid() == 0 else "qemu:///session"


def _record_and_resume(hook: Hook, element: str, resume: bool) -> int:
    import subprocess

    from hvcpolicy import XMLNS
    from hvcpolicy.domainxml import unprefixed

    element = unprefixed(element)
    name = hook.domain.uuid or hook.domain.name
    # One virsh, two commands: the metadata first, so the guest never runs unrecorded.
    script = [
        "metadata",
        "--domain",
        name,
        "--uri",
        XMLNS,
        "--key",
        "hvc",
        "--live",
        "--set",
        element,
    ]
    cmds = virsh_quote(script) + (f" ; resume --domain {name}" if resume else "")
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "HOME": os.environ.get("HOME", "/"),
        "LC_ALL": "C",
        "LIBVIRT_AUTOSTART": "0",
    }
    try:
        done = subprocess.run(
            ["virsh", "-q", "-c", libvirt_uri(), cmds],
            env=env,
            capture_output=True,
            timeout=60,
            check=False,
        )
        ok = done.returncode == 0
        detail = done.stderr.decode("utf-8", "replace").strip()
    except (OSError, subprocess.TimeoutExpired) as err:
        ok, detail = False, str(err)
    hook.audit["stage"] = "started/recorder"
    hook.log(
        ("recorded-resumed" if resume else "recorded") if ok else "record-failed",
        warning=not ok,
        reason=detail or "-",
    )
    return 0 if ok else 1


def virsh_quote(words: list[str]) -> str:
    """virsh's own command-line quoting (single quotes; a quote inside is '\\'')."""
    return " ".join("'" + w.replace("'", "'\\''") + "'" for w in words)
