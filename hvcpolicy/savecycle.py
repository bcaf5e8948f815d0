"""The stream backend: a stock QEMU's firmware registers, through libvirt's save and restore of
the never-run guest (SPEC §8, ``reference/qemu-migration-stream.md``).

QEMU carries every firmware register in each vCPU's cpreg list of its migration stream and
writes them into KVM when it loads one, before any vCPU runs. So, for a guest started paused
that never ran:

1. ``read``: save it (``VIR_DOMAIN_SAVE_PAUSED``; QEMU exits) into a root-only directory, and
   read every vCPU's list from the image (:mod:`hvcpolicy.imagefile`);
2. ``write``: patch every vCPU's list in place, check nobody else changed the image since, and
   restore it paused with the domain XML carrying ``<hvc:applied backend="stream">``: QEMU
   loads the values into KVM (a value KVM refuses fails the load: nothing runs);
3. ``read`` again: the read-back. An external memory-only snapshot of the paused, restored guest
   (``VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA``) migrates its state to a file *without stopping
   QEMU*: on save QEMU refreshes every vCPU's list from KVM (``cpu_pre_save`` ->
   ``write_kvmstate_to_list``, KVM_GET_ONE_REG per id), so the file holds what KVM holds now,
   not what was written. About a tenth of a second against a save's seconds (no QEMU to stop);
4. ``resume``: only after a read-back that equals what was written; then the images go.

When the host's snapshot predicts nothing to write, ``read`` starts with a memory snapshot of
the paused guest instead of a save: if the guest then needs no write it is resumed and its QEMU
never stops. If it does need one, QEMU (7.2 at least) refuses to migrate again once a snapshot
has left it in ``postmigrate`` ("paused due to previous migration"), so that QEMU is shut off
instead (it never ran) and the snapshot's image, which is a libvirt save image, is the one
patched and restored.

A failure never resumes the guest and never deletes an image while the guest is not running:
:meth:`StreamFirmware.settle` says where the guest is and how to recover. A journal
(``UUID.cycle``) lets the next ``hvcpolicy start`` recognise a cycle that was killed midway.
"""

from __future__ import annotations

import contextlib
import os
import stat

from hvcpolicy import libvirt
from hvcpolicy.errors import HvcError, Unavailable
from hvcpolicy.firmware import STREAM_BACKEND, Registers
from hvcpolicy.startlock import BUSY as BUSY_PHASE
from hvcpolicy.startlock import RESTORE as RESTORE_PHASE

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any

    from hvcpolicy.saveimage import Image
    from hvcpolicy.startlock import StartLock

SYSTEM_DIR = "/var/lib/hvcpolicy/save"
USER_DIR = ".local/state/hvcpolicy/save"  # under the home of a qemu:///session user
# Tests stop the cycle at one step: "STEP:kill" (SIGKILL, as a crash would) or "STEP:stop"
# (SIGSTOP, until the test sends SIGCONT). Steps: started saved patched restored read-back.
FAULT_ENV = "HVCPOLICY_TEST_FAULT"

# the journal's phases: what the libvirt domain id in it is the id of
STARTING, STARTED = "starting", "started"
SAVING, SAVED, RESTORING, RESTORED = "saving", "saved", "restoring", "restored"


def default_dir() -> str:
    if os.geteuid() == 0:
        return SYSTEM_DIR
    return os.path.join(os.path.expanduser("~"), USER_DIR)


def image_dir(path: str) -> str:
    """``path``, made 0700 when missing; Unavailable unless it is a directory of this user that
    no one else can read or write (images hold the guest's memory)."""
    try:
        os.makedirs(path, 0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError as err:
        raise Unavailable(f"{path}: cannot make the save directory: {err.strerror}") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise Unavailable(
            f"{path}: the save directory must be a directory owned by uid {os.geteuid()} with "
            "mode 0700 (it holds guests' memory)"
        )
    return path


def checkpoint(step: str) -> None:
    """The test seam of :data:`FAULT_ENV`: stop here when asked to."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    name, _, action = spec.partition(":")
    if name == step:
        import signal

        os.kill(os.getpid(), signal.SIGSTOP if action == "stop" else signal.SIGKILL)


class Paths:
    """The files of one domain's cycle, named by its UUID (names may be anything)."""

    __slots__ = ("directory", "image", "journal", "readback")

    def __init__(self, directory: str, uuid: str) -> None:
        self.directory = directory
        self.image = os.path.join(directory, f"{uuid}.save")
        self.readback = os.path.join(directory, f"{uuid}.readback")
        self.journal = os.path.join(directory, f"{uuid}.cycle")

    def journal_entry(self) -> tuple[str, int] | None:
        """What an earlier cycle recorded: (phase, libvirt domain id), None without a journal."""
        try:
            with open(self.journal, encoding="ascii") as f:
                words = f.read(64).split()
        except (OSError, UnicodeDecodeError):
            return None
        if len(words) != 2 or not words[1].lstrip("-").isdigit():
            return None
        return words[0], int(words[1])

    def leftovers(self) -> list[str]:
        return [p for p in (self.image, self.readback, self.journal) if os.path.lexists(p)]

    def clear(self) -> None:
        for path in (self.readback, self.image, self.journal):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def record(self, phase: str, domid: int) -> None:
        """The journal: written whole, then renamed (a killed start leaves the old one or the
        new). No fsync: it is for a process that dies, not a host (whose guests die with it)."""
        tmp = self.journal + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, f"{phase} {domid}\n".encode("ascii"))
        finally:
            os.close(fd)
        os.replace(tmp, self.journal)


def _fingerprint(path: str) -> tuple[int, int, int, int]:
    """What any write to the file changes: the kernel sets ctime, nobody can set it back."""
    st = os.stat(path, follow_symlinks=False)
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _vcpu_registers(image: Image, any_register: bool) -> list[Registers]:
    return [dict(c.registers) if any_register else c.firmware for c in image.stream.vcpus]


class StreamFirmware:
    """One never-run guest's firmware registers through save -> patch -> restore (the
    :class:`~hvcpolicy.firmware.Firmware` interface). ``policy_element(registers)`` renders the
    ``<hvc:policy>`` element (with ``<hvc:applied backend="stream">``) the restore records, or
    None to restore the XML as saved. ``lock``: the domain's start lock, whose phase the
    restore sets, so the hook recognises the restore as this cycle's. ``snapshot_first``: read
    by a memory snapshot before deciding to save (the host's snapshot predicts no write).
    ``any_register``: read and write every register of the cpreg list, not only the firmware
    ones (tests on TCG, whose lists have no firmware registers)."""

    backend = STREAM_BACKEND

    def __init__(
        self,
        conn: Any,
        dom: Any,
        paths: Paths,
        policy_element: Callable[[Registers], str | None],
        *,
        snapshot_first: bool = False,
        any_register: bool = False,
        lock: StartLock | None = None,
    ) -> None:
        self.conn = conn
        self.dom = dom
        self.name = str(libvirt.call("name", dom.name))
        self.uuid = str(libvirt.call("uuid", dom.UUIDString))
        self.where = f"domain {self.name!r}"
        self.paths = paths
        self.policy_element = policy_element
        self.snapshot_first = snapshot_first
        self.any_register = any_register
        self.lock = lock  # its phase says "restore" while libvirt restores: the hook steps aside
        self.sparse = libvirt.sparse_saves(conn, libvirt.domain_xml(dom))
        self.domid = libvirt.domain_id(dom)
        self.state = "prelaunch"  # started paused by the caller, never ran
        self.before: list[Registers] | None = None  # as first read
        self.expect: Image | None = None  # the saved image as read (patch checks against it)
        self.saved = False
        self.restored = False
        self.written: Registers | None = None  # what the restored guest must hold
        self.verified = False  # a read-back after the restore equalled ``written``
        # the image as hvcpolicy last left it (saved, patched): any other write changes it
        self.fingerprint: tuple[int, int, int, int] | None = None

    # --- the Firmware interface ----------------------------------------------------------------

    def runstate(self) -> str:
        return self.state

    def read(self) -> list[Registers]:
        if self.restored:
            return self._read_back()
        if self.before is None:
            if self.snapshot_first:
                self._snapshot_image()
            else:
                self._save()
        assert self.before is not None
        return self.before

    def write(self, writes: Mapping[int, int]) -> None:
        if self.restored:
            raise Unavailable(
                f"{self.where}: written once already; a second write needs a new save"
            )
        if self.before is None:
            self._save()
        elif not self.saved:  # read by a snapshot: that image becomes the one to restore
            self._stop()
        assert self.before is not None
        target = dict(self.before[0])
        target.update(writes)
        if writes:
            self._patch(writes)
        self._restore(target)
        if self.any_register:  # TCG's lists hold aliases of one state: hold only the writes
            self.written = dict(writes)

    def resume(self) -> None:
        if self.saved and not self.restored:  # read, nothing written: load what was saved
            assert self.before is not None
            self._restore(dict(self.before[0]))
        if self.restored and not self.verified:
            self._read_back()
        # (read by a snapshot and nothing to write: that read was of KVM itself, and QEMU still
        # holds it; ``postmigrate`` resumes like ``prelaunch``)
        libvirt.resume(self.dom)
        self.state = "running"
        self.paths.clear()  # the guest runs: its never-run images are worth nothing now

    # --- the steps -----------------------------------------------------------------------------

    def _snapshot(self, path: str) -> Image:
        """The guest's state, written to ``path`` by QEMU without stopping (the guest stays
        paused; its vCPU lists refreshed from KVM first). QEMU then refuses a later save
        ("paused due to previous migration"): a write restores this image instead."""
        from hvcpolicy.domainxml import disk_targets
        from hvcpolicy.imagefile import read_image

        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        xml = libvirt.domain_xml(self.dom)
        libvirt.memory_snapshot(self.dom, path, disk_targets(xml))
        os.chmod(path, 0o600)
        return read_image(path)

    def _snapshot_image(self) -> None:
        self.paths.record(STARTED, self.domid)
        self.expect = self._snapshot(self.paths.image)
        self.before = _vcpu_registers(self.expect, self.any_register)
        self.fingerprint = _fingerprint(self.paths.image)

    def _stop(self) -> None:
        """A guest read by a snapshot needs a write: stop its QEMU (it never ran, nothing is
        lost); the snapshot's image is what the restore loads."""
        libvirt.destroy(self.dom)
        self.saved = True
        self.paths.record(SAVED, self.domid)
        checkpoint("saved")

    def _save(self) -> None:
        from hvcpolicy.imagefile import read_image

        self.paths.record(SAVING, self.domid)
        libvirt.save_paused(self.dom, self.paths.image, self.sparse)
        self.saved = True
        self.paths.record(SAVED, self.domid)
        os.chmod(self.paths.image, 0o600)
        self.expect = read_image(self.paths.image)
        self.before = _vcpu_registers(self.expect, self.any_register)
        self.fingerprint = _fingerprint(self.paths.image)
        checkpoint("saved")

    def _patch(self, writes: Mapping[int, int]) -> None:
        from hvcpolicy.imagefile import patch_image

        self._unchanged()
        self.expect = patch_image(
            self.paths.image, writes, expect=self.expect, any_register=self.any_register
        )
        self.fingerprint = _fingerprint(self.paths.image)
        checkpoint("patched")

    def _restore(self, target: Registers) -> None:
        """Restore paused with ``<hvc:applied>`` recording ``target`` (what the read-back
        must then find)."""
        from hvcpolicy.imagefile import read_image

        path = self.paths.image
        self._unchanged()
        # the image as it will load: every vCPU must carry the target (a last check, cheap)
        image = read_image(path)
        for regs in _vcpu_registers(image, self.any_register):
            if any(regs.get(rid) != v for rid, v in target.items()):
                raise Unavailable(
                    f"{self.where}: {path} does not hold the planned values on every vCPU; "
                    "not restored"
                )
        xml = libvirt.save_image_xml(self.conn, path)
        element = self.policy_element(target)
        if element is not None:
            from hvcpolicy.domainxml import set_policy_element

            xml = set_policy_element(xml, element)
        self.paths.record(RESTORING, self.domid)
        self.written = target
        if self.lock is not None:
            self.lock.phase(RESTORE_PHASE)
        try:
            libvirt.restore_paused(self.conn, path, xml)
        finally:
            if self.lock is not None:
                self.lock.phase(BUSY_PHASE)
        self.restored = True
        self.dom = libvirt.lookup_uuid(self.conn, self.uuid)
        self.domid = libvirt.domain_id(self.dom)
        self.paths.record(RESTORED, self.domid)
        self.state = "prelaunch"  # a never-run guest's image restores into prelaunch
        checkpoint("restored")

    def _unchanged(self) -> None:
        """The image is as hvcpolicy left it: nobody else wrote it since."""
        path = self.paths.image
        try:
            now: tuple[int, int, int, int] | None = _fingerprint(path)
        except OSError:
            now = None
        if now != self.fingerprint:
            raise Unavailable(
                f"{self.where}: {path} was changed (or removed) by someone else after hvcpolicy "
                "wrote it; not restored"
            )

    def _read_back(self) -> list[Registers]:
        try:
            after = _vcpu_registers(self._snapshot(self.paths.readback), self.any_register)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.paths.readback)
        assert self.written is not None
        for index, regs in enumerate(after):
            diffs = [rid for rid, v in self.written.items() if regs.get(rid) != v]
            if diffs:
                from hvcpolicy import catalogue as cat

                shown = ", ".join(
                    f"{cat.reg_name(r)} {cat.fmt_value(regs.get(r, 0))} (wrote "
                    f"{cat.fmt_value(self.written[r])})"
                    for r in diffs[:4]
                )
                raise Unavailable(
                    f"{self.where}: after the restore, KVM on vCPU {index} holds other values "
                    f"than were written: {shown}"
                )
        self.verified = True
        checkpoint("read-back")
        return after

    # --- failure -------------------------------------------------------------------------------

    def settle(self) -> str:
        """After a failure: leave the guest not running (a never-run guest of this cycle is
        destroyed; one someone else started is left alone) and keep every image.
        -> where the guest is now and how to recover, for the one-line message."""
        start_again = f"`hvcpolicy start {self.name}` starts it afresh"
        try:
            # a fresh handle: a handle's id is the one it was looked up with
            self.dom = libvirt.lookup_uuid(self.conn, self.uuid)
            active = libvirt.is_active(self.dom)
            domid = libvirt.domain_id(self.dom) if active else -1
        except HvcError:
            return (
                f"libvirt is unreachable: the guest was not resumed; once libvirtd answers, "
                f"{start_again}" + self._kept()
            )
        if active and domid != self.domid:
            return (
                f"someone else started the domain during hvcpolicy's cycle (libvirt id {domid}): "
                "it runs with firmware values hvcpolicy did not write; `virsh destroy "
                f"{self.name}`, then {start_again}" + self._kept()
            )
        if active and self.state != "running":
            try:
                libvirt.destroy(self.dom)
            except HvcError as err:
                return (
                    f"the guest never ran and is paused, but could not be shut off ({err}); "
                    f"`virsh destroy {self.name}`, then {start_again}" + self._kept()
                )
        if self.saved:
            return f"the guest never ran and is shut off; {start_again}" + self._kept()
        return f"the guest never ran and is shut off; {start_again}"

    def _kept(self) -> str:
        kept = [p for p in (self.paths.image,) if os.path.exists(p)]
        if not kept:
            return ""
        return f" (its never-run image stays at {kept[0]} until then)"


def with_context(err: HvcError, text: str) -> HvcError:
    """``err`` with ``text`` appended to its one-line message."""
    err.message = f"{err.message}; {text}"
    err.args = (err.message,)
    return err
