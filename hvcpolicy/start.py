"""``hvcpolicy start DOMAIN``: start owns the start (SPEC §6-8, issue 14).

Under the domain's start lock (:mod:`hvcpolicy.startlock`; the hook's sh pre-filter steps aside
for ``prepare`` and ``started`` while it is held, so neither the paused start nor the stream
backend's restore is taken for a new start): check the host (the planner against this host's
snapshot, as the hook's ``prepare`` would), start paused, pick the backend, run the one
apply/verify flow (:func:`hvcpolicy.enforce.enforce`), record ``<hvc:applied>`` in the live
XML, resume, write one audit line.

Backends (:func:`firmware_for`): the QMP property when the domain's QEMU has it; else the stream
backend (:mod:`hvcpolicy.savecycle`) when the guest can be saved; else
``enforcement.unsupported-qemu``. The hook's detached child for ``virsh start --paused`` with
``<hvc:resume after="apply"/>`` runs :func:`enforce_paused` on the guest libvirt started.

A failure never resumes the guest: a never-run guest is shut off (nothing is lost), every save
image is kept, and the one-line message says where the guest is and how to recover. A start that
was killed midway is recognised by the next one (the stream backend's journal) and started
afresh.
"""

from __future__ import annotations

from hvcpolicy import libvirt
from hvcpolicy.errors import HvcError, InterfaceMissing, UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from hvcpolicy.domainxml import Domain
    from hvcpolicy.enforce import ApplyResult
    from hvcpolicy.firmware import Firmware, Registers
    from hvcpolicy.policy import Policy
    from hvcpolicy.snapshot import Snapshot
    from hvcpolicy.startlock import StartLock


class Outcome:
    """What a start did, for the CLI's line and the audit line."""

    __slots__ = ("backend", "notes", "outcome", "result")

    def __init__(self, result: ApplyResult, notes: list[str]) -> None:
        self.result = result
        self.backend = result.backend
        self.outcome = result.outcome
        self.notes = notes


def firmware_for(
    conn: Any,
    dom: Any,
    live: Domain,
    live_xml: str,
    policy_element: Any,
    timeout: float,
    save_dir: str,
    snapshot_first: bool,
    lock: StartLock | None = None,
) -> Firmware:
    """The backend for this guest: the QMP property when its QEMU has it, else the stream
    backend when it can be saved; InterfaceMissing (the flow then applies
    ``enforcement.unsupported-qemu``) when neither reaches its registers."""
    sock = live.qmp_socket
    if sock:
        from hvcpolicy.qmp import QMP

        qmp = QMP(sock, timeout)
        qmp.connect()
        try:
            if qmp.has_interface():
                return qmp
        except BaseException:
            qmp.close()
            raise
        qmp.close()  # a stock QEMU: QEMU goes away on the save, let it go cleanly
    from hvcpolicy.domainxml import unsaveable

    why = unsaveable(live_xml)
    if why is not None:
        raise InterfaceMissing(
            f"domain {live.name!r}: its QEMU has no firmware-register interface and the guest "
            f"cannot be saved for the stream backend: {why}"
        )
    from hvcpolicy.savecycle import Paths, StreamFirmware, image_dir

    paths = Paths(image_dir(save_dir), str(libvirt.call("uuid", dom.UUIDString)))
    return StreamFirmware(
        conn, dom, paths, policy_element, snapshot_first=snapshot_first, lock=lock
    )


def enforce_paused(
    conn: Any,
    dom: Any,
    policy: Policy,
    snap: Snapshot | None,
    *,
    timeout: float,
    save_dir: str,
    lock: StartLock | None = None,
) -> Outcome:
    """Enforce ``policy`` on the domain ``dom``, which libvirt has just started paused (it never
    ran): pick the backend, run the flow, record ``<hvc:applied>``, resume. On failure the guest
    is not resumed; the error's message says where it is and how to recover."""
    from hvcpolicy.domainxml import applied_element, parse_domain
    from hvcpolicy.enforce import UNSUPPORTED_WARNED, enforce, unsupported
    from hvcpolicy.firmware import STREAM_BACKEND
    from hvcpolicy.planner import plan_start
    from hvcpolicy.savecycle import StreamFirmware

    name = str(libvirt.call("name", dom.name))
    where = f"domain {name!r}"
    live_xml = libvirt.domain_xml(dom)
    live = parse_domain(live_xml, where)
    meta = live.meta
    host = snap.registers if snap is not None else None

    def element(registers: Registers) -> str | None:
        return None if meta is None else applied_element(meta, registers, snap, STREAM_BACKEND)

    # the host's snapshot predicts whether a fresh guest needs a write: when not, the stream
    # backend reads by a snapshot first and, if the guest agrees, never stops QEMU at all
    predicted = host is None or bool(plan_start(policy, host).writes)
    fw: Firmware | None = None
    try:
        try:
            fw = firmware_for(
                conn,
                dom,
                live,
                live_xml,
                element,
                timeout,
                save_dir,
                snapshot_first=not predicted,
                lock=lock,
            )
        except InterfaceMissing as missing:
            from typing import cast

            # refuse: raises; warn: the guest runs unenforced, with the warning
            result = unsupported(cast("Firmware", _Nowhere(where)), policy, missing.message)
            libvirt.resume(dom)
            result.resumed = True
            return Outcome(result, [])
        result = enforce(fw, policy, host=host, runstate="prelaunch", domain=name)
        # a saved guest is recorded by its restore (in resume, when nothing was written)
        saved = getattr(fw, "saved", False)
        if result.outcome != UNSUPPORTED_WARNED and meta is not None and not saved:
            registers = result.applied_registers()
            recorded = applied_element(meta, registers, snap, fw.backend)
            libvirt.set_policy_metadata(getattr(fw, "dom", dom), recorded, live=True)
        if isinstance(fw, StreamFirmware):
            fw.resume()  # through libvirt, then its images go
        else:
            # through libvirt, not QMP's `cont`: libvirt's own state is then "running" when
            # start returns, not whenever it processes QEMU's RESUME event
            fw_close = getattr(fw, "close", None)
            if fw_close is not None:
                fw_close()
            libvirt.resume(dom)
        result.resumed = True
        return Outcome(result, [])
    except HvcError as err:
        raise _settled(err, fw, dom, name) from None
    finally:
        close = getattr(fw, "close", None)
        if close is not None:
            close()


class _Nowhere:
    """What ``unsupported`` names when no backend reaches the registers (it reads only
    ``backend`` and ``where``)."""

    backend = "-"

    def __init__(self, where: str) -> None:
        self.where = where


def _settled(err: HvcError, fw: Firmware | None, dom: Any, name: str) -> HvcError:
    """``err`` with where the guest is now and how to recover; a never-run guest is shut off."""
    from hvcpolicy.savecycle import StreamFirmware, with_context

    if isinstance(fw, StreamFirmware):
        return with_context(err, fw.settle())
    try:
        if libvirt.is_active(dom):
            libvirt.destroy(dom)
        text = f"the guest never ran and is shut off; `hvcpolicy start {name}` starts it again"
    except HvcError:
        text = (
            f"the guest was not resumed (libvirt did not answer); `virsh destroy {name}` if it "
            f"is paused, then `hvcpolicy start {name}`"
        )
    return with_context(err, text)


def start(
    conn: Any,
    dom: Any,
    policy: Policy,
    snap: Snapshot | None,
    *,
    timeout: float,
    save_dir: str,
    lock: StartLock | None = None,
) -> Outcome:
    """What ``hvcpolicy start`` does once it holds the start lock and has checked the host:
    recover from an interrupted start, start paused, :func:`enforce_paused`."""
    from hvcpolicy.savecycle import STARTED, STARTING, Paths, checkpoint
    from hvcpolicy.startlock import BUSY as BUSY_PHASE
    from hvcpolicy.startlock import START as START_PHASE

    name = str(libvirt.call("name", dom.name))
    notes = recover(dom, name, save_dir)
    paths = Paths(save_dir, str(libvirt.call("uuid", dom.UUIDString)))
    paths.record(STARTING, -1)  # a start killed from here on is recognised by the next one
    if lock is not None:
        lock.phase(START_PHASE)  # the hook's prepare and started step aside
    try:
        libvirt.start_paused(dom)
    except HvcError:
        paths.clear()
        raise
    finally:
        if lock is not None:
            lock.phase(BUSY_PHASE)
    paths.record(STARTED, libvirt.domain_id(dom))
    checkpoint("started")
    outcome = enforce_paused(conn, dom, policy, snap, timeout=timeout, save_dir=save_dir, lock=lock)
    paths.clear()
    outcome.notes[:0] = notes
    return outcome


def recover(dom: Any, name: str, save_dir: str) -> list[str]:
    """Before a start: what an earlier ``hvcpolicy start`` killed midway left. Its never-run
    guest (paused, and the journal names it) is shut off and its images removed (the guest never
    ran in them: a fresh start loses nothing). -> notes for the user. UsageError when the domain
    runs for another reason."""
    from hvcpolicy.savecycle import RESTORING, STARTING, Paths

    paths = Paths(save_dir, str(libvirt.call("uuid", dom.UUIDString)))
    notes: list[str] = []
    if libvirt.is_active(dom):
        entry = paths.journal_entry()
        ours = entry is not None and (
            entry[1] == libvirt.domain_id(dom) or entry[0] in (STARTING, RESTORING)
        )
        if not ours or libvirt.state(dom) != "paused":
            raise UsageError(f"domain {name!r} is already running")
        libvirt.destroy(dom)
        notes.append("shut off the never-run guest of an interrupted `hvcpolicy start`")
    if paths.leftovers():
        paths.clear()
        notes.append(f"removed the never-run image of an interrupted start from {save_dir}")
    return notes
