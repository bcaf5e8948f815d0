"""libvirt save images made by the real system libvirtd (``virsh save``, ``managedsave``) of a
never-run 2-vCPU TCG guest: hvcpolicy.imagefile reads them, patches every vCPU in place, and
libvirt restores the patched image; a second save shows each vCPU got the patched value."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hvcpolicy.imagefile import patch_image, read_image
from tests.libvirt.conftest import SYSTEM_URI, Daemon, Lab, run, virsh

TPIDR_EL0 = 0x603000000013DE82  # a per-vCPU register TCG migrates (no firmware ids under TCG)


def two_vcpu_xml(name: str) -> str:
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>2</vcpu>
  <os><type arch='aarch64' machine='virt'>hvm</type></os>
  <cpu mode='custom' match='exact'><model fallback='forbid'>cortex-a57</model></cpu>
  <devices><console type='pty'/></devices>
</domain>
"""


@pytest.fixture()
def paused_guest(lab: Lab, system_libvirtd: Daemon) -> Iterator[Callable[[], str]]:
    """Define and ``start --paused`` a 2-vCPU guest without hvcpolicy metadata (the hook leaves
    it alone); every guest made is destroyed and undefined afterwards."""
    made: list[str] = []

    def make() -> str:
        name = f"hvct-save-{uuid.uuid4().hex[:8]}"
        xml = lab.root / f"{name}.xml"
        xml.write_text(two_vcpu_xml(name))
        virsh(SYSTEM_URI, "define", str(xml))
        made.append(name)
        virsh(SYSTEM_URI, "start", name, "--paused")
        return name

    yield make
    for name in made:
        virsh(SYSTEM_URI, "managedsave-remove", name, check=False, timeout=30)
        virsh(SYSTEM_URI, "destroy", name, check=False, timeout=30)
        virsh(SYSTEM_URI, "undefine", name, check=False, timeout=30)


def test_virsh_save_read_patch_restore(lab: Lab, paused_guest: Callable[[], str]) -> None:
    name = paused_guest()
    image_path = lab.root / f"{name}.save"
    virsh(SYSTEM_URI, "save", name, str(image_path))
    image = read_image(str(image_path))
    assert image.kind == "libvirt-raw" and image.save is not None
    assert image.save.version == 2 and image.save.was_running is False
    assert f"<name>{name}</name>" in image.save.xml
    assert image.stream.start == image.save.stream_offset == 92 + image.save.data_len
    assert [c.instance_id for c in image.stream.vcpus] == [0, 1]
    assert image.stream.firmware() == {}  # TCG

    size = image_path.stat().st_size
    after = patch_image(str(image_path), {TPIDR_EL0: 0xC0FFEE}, expect=image, any_register=True)
    assert [c.registers[TPIDR_EL0] for c in after.stream.vcpus] == [0xC0FFEE] * 2
    assert image_path.stat().st_size == size
    assert after.save == image.save

    # libvirt restores the patched image (QEMU loads every vCPU's list), and saving the
    # restored guest again carries the patched value on both vCPUs
    virsh(SYSTEM_URI, "restore", str(image_path), "--paused")
    assert virsh(SYSTEM_URI, "domstate", name).stdout.strip() == "paused"
    again = lab.root / f"{name}-again.save"
    virsh(SYSTEM_URI, "save", name, str(again))
    resaved = read_image(str(again))
    assert [c.registers[TPIDR_EL0] for c in resaved.stream.vcpus] == [0xC0FFEE] * 2


def test_managed_save_image_is_read(lab: Lab, paused_guest: Callable[[], str]) -> None:
    name = paused_guest()
    virsh(SYSTEM_URI, "managedsave", name)
    path = f"/var/lib/libvirt/qemu/save/{name}.save"
    assert os.path.exists(path)
    image = read_image(path)
    assert image.kind == "libvirt-raw" and image.save is not None
    assert f"<name>{name}</name>" in image.save.xml
    assert len(image.stream.vcpus) == 2
    # the CLI reads it too, and says so on one line per fact
    done = lab.hvcpolicy("image", "show", path)
    assert f"{path}: libvirt save image (raw, version 2, was running: no)" in done.stdout
    assert "2 vCPU(s)" in done.stdout


def test_a_corrupted_libvirt_image_is_refused_by_the_cli(
    lab: Lab, paused_guest: Callable[[], str]
) -> None:
    name = paused_guest()
    path = lab.root / f"{name}.save"
    virsh(SYSTEM_URI, "save", name, str(path))
    data = bytearray(path.read_bytes())
    image = read_image(str(path))
    data[image.stream.vcpus[1].ids_offset - 4] ^= 0x01  # vCPU 1's count
    bad = Path(lab.root / "corrupt.save")
    bad.write_bytes(bytes(data))
    done = run(
        ["python3", "-m", "hvcpolicy", "image", "show", str(bad)],
        check=False,
        env={**lab.env()},
        cwd="/",
    )
    assert done.returncode == 4
    assert done.stderr.count("\n") == 1 and str(bad) in done.stderr, done.stderr
    assert "vCPU 1" in done.stderr and "Traceback" not in done.stderr
