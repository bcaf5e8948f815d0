"""The stream backend's pieces that need no libvirt: its directory, its journal, and the domain
XML edits and checks it makes (``domainxml.set_policy_element``, ``disk_targets``,
``unsaveable``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hvcpolicy import savecycle
from hvcpolicy.domainxml import disk_targets, parse_domain, set_policy_element, unsaveable
from hvcpolicy.errors import Unavailable

NS = "https://hvcpolicy.dev/xmlns/libvirt/1"
XML = f"""<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>web1</name>
  <uuid>6a1f2c3d-0000-4000-8000-000000000002</uuid>
  <metadata>
    <hvc:policy xmlns:hvc="{NS}" ref="fleet-2026"><hvc:resume after="apply"/></hvc:policy>
    <other:thing xmlns:other="https://example.org/other">kept</other:thing>
  </metadata>
  <memory unit='KiB'>131072</memory>
  <devices>
    <disk type='file' device='disk'><source file='/x.img'/><target dev='vda' bus='virtio'/></disk>
    <disk type='file' device='cdrom'><target dev='sda' bus='scsi'/></disk>
    <console type='pty'/>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-qmp'/><qemu:arg value='unix:/q.sock,server=on,wait=off'/>
  </qemu:commandline>
</domain>"""


def test_the_save_directory_is_made_private_and_a_shared_one_is_refused(tmp_path: Path) -> None:
    made = savecycle.image_dir(str(tmp_path / "save"))
    assert os.stat(made).st_mode & 0o777 == 0o700
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    with pytest.raises(Unavailable, match="mode 0700"):
        savecycle.image_dir(str(shared))
    os.symlink(made, tmp_path / "link")
    with pytest.raises(Unavailable, match="must be a directory"):
        savecycle.image_dir(str(tmp_path / "link"))


def test_the_journal_says_what_a_killed_cycle_left(tmp_path: Path) -> None:
    paths = savecycle.Paths(str(tmp_path), "6a1f2c3d-0000-4000-8000-000000000002")
    assert paths.journal_entry() is None and paths.leftovers() == []
    paths.record(savecycle.SAVED, 17)
    assert paths.journal_entry() == ("saved", 17)
    assert os.stat(paths.journal).st_mode & 0o777 == 0o600
    Path(paths.image).write_bytes(b"x")
    assert sorted(paths.leftovers()) == sorted([paths.image, paths.journal])
    for junk in (b"", b"saved", b"saved x", b"a b c", b"\xff\xfe 1"):
        Path(paths.journal).write_bytes(junk)
        assert paths.journal_entry() is None
    paths.clear()
    assert paths.leftovers() == []


def test_no_fault_is_injected_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(savecycle.FAULT_ENV, raising=False)
    savecycle.checkpoint("saved")  # returns: the process is still here
    monkeypatch.setenv(savecycle.FAULT_ENV, "restored:kill")
    savecycle.checkpoint("saved")  # another step: still here


def test_the_restore_xml_gets_one_policy_element_and_keeps_everything_else() -> None:
    element = (
        f'<hvc:policy xmlns:hvc="{NS}" ref="fleet-2026"><hvc:applied host="h" kernel="k" '
        'at="t" backend="stream"><hvc:register id="0x6030000000160002" value="0x1"/>'
        "</hvc:applied></hvc:policy>"
    )
    out = set_policy_element(XML, element)
    dom = parse_domain(out)
    assert dom.meta is not None and dom.meta.applied is not None
    assert dom.meta.applied.backend == "stream"
    assert dom.meta.applied.registers == {0x6030000000160002: 0x1}
    assert not dom.meta.resume_after_apply  # replaced whole, as setMetadata does
    assert out.count(f'xmlns:hvc="{NS}"') == 1 and out.count("hvc:policy ") == 1
    assert "<other:thing" in out and "kept" in out  # another tool's metadata stays
    assert dom.commandline_qmp == "/q.sock"  # <qemu:commandline> still read by its URI
    bare = set_policy_element("<domain><name>x</name><uuid>u</uuid></domain>", element)
    assert parse_domain(bare).meta is not None  # a <metadata> made where there was none


def test_every_disk_is_named_for_the_memory_only_snapshot() -> None:
    assert disk_targets(XML) == ["vda", "sda"]
    assert disk_targets("<domain><devices/></domain>") == []


@pytest.mark.parametrize(
    ("device", "why"),
    [
        ("<devices><hostdev mode='subsystem' type='pci'/></devices>", "VFIO"),
        (
            "<devices><filesystem type='mount'><driver type='virtiofs'/></filesystem></devices>",
            "virtiofs",
        ),
        ("<devices><interface type='vhostuser'/></devices>", "vhost-user"),
        ("<features><mte/></features>", "MTE"),
        (
            "<qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
            "<qemu:arg value='-machine'/><qemu:arg value='virt,mte=on'/></qemu:commandline>",
            "MTE",
        ),
    ],
)
def test_guests_libvirt_cannot_save_are_named(device: str, why: str) -> None:
    reason = unsaveable(f"<domain><name>g</name>{device}</domain>")
    assert reason is not None and why in reason
    assert unsaveable(XML) is None
