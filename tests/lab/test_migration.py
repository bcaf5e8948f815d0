"""`hvcpolicy check-migration` held to real QEMU-on-KVM migrations between the lab's kernels.

For each QEMU of the lab's rootfs and each ordered pair of lab kernels (and each kernel to
itself, as a control), the lab started a KVM guest with ``-S`` on the source kernel, migrated it
to a file on the share, and loaded that file with ``-incoming`` on the destination kernel
(lab/guest/migrate.py). The guest never ran, so its firmware registers are the source kernel's
defaults: exactly its probed snapshot. hvcpolicy is asked the same question from the guest's
registers as ``<hvc:applied>`` and the destination's probed snapshot with that QEMU's version.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest

from hvcpolicy import catalogue as cat
from hvcpolicy.cli.main import main
from tests.lab.labdata import LABELS, LabKernel

POLICY = """apiVersion: hvcpolicy/v1
kind: FirmwarePolicy
metadata:
  name: lab
  description: Offers whatever the host offers; only the kernel and QEMU can say no
spec:
  features:
    trng: allow
    pv-time: allow
    kvm-features: allow
    ptp: allow
    discover-impl-ver: allow
    discover-impl-cpus: allow
  unknown: allow
"""

DOMAIN = """<domain type='kvm'>
  <name>lab-guest</name>
  <uuid>6c1b7a1e-3f0c-4c52-9a51-1f6b0e1e0a0b</uuid>
  <metadata>
    <hvc:policy xmlns:hvc="https://hvcpolicy.dev/xmlns/libvirt/1" ref="lab">
      <hvc:applied host="{host}" kernel="{kernel}" at="2026-11-25T00:00:00Z">
{registers}
      </hvc:applied>
    </hvc:policy>
  </metadata>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='aarch64' machine='virt'>hvm</type></os>
</domain>
"""

PAIRS = [(s, d) for s in LABELS for d in LABELS]


def qemu_versions(lab: dict[str, LabKernel]) -> list[str]:
    versions: set[str] = set()
    for k in lab.values():
        versions |= {s["qemu"] for s in k.read_json("save.json")["saves"]}
    return sorted(versions)


def real_outcome(src: LabKernel, dst: LabKernel, qemu: str) -> dict[str, Any]:
    loads = dst.read_json("load.json")["loads"]
    for rec in loads:
        if rec["source"] == src.release and rec["qemu"] == qemu:
            return dict(rec)
    raise AssertionError(f"no migration {src.release} -> {dst.release} with QEMU {qemu} recorded")


def predict(src: LabKernel, dst: LabKernel, qemu: str, tmp: Path) -> tuple[int, str]:
    source = src.read_json("host.json")
    regs = "\n".join(
        f'        <hvc:register id="{rid}" value="{value}"/>'
        for rid, value in source["registers"].items()
    )
    xml = tmp / "domain.xml"
    xml.write_text(DOMAIN.format(host=source["host"], kernel=source["kernel"], registers=regs))
    policies = tmp / "policies"
    policies.mkdir(exist_ok=True)
    (policies / "lab.yaml").write_text(POLICY)
    dest = dict(dst.read_json("host.json"))
    dest["qemu"] = qemu
    dest_path = tmp / "dest.json"
    dest_path.write_text(json.dumps(dest))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(
            [
                "check-migration",
                "--policy-dir",
                str(policies),
                "--domain-xml",
                str(xml),
                "--to",
                str(dest_path),
            ]
        )
    return rc, out.getvalue() + err.getvalue()


@pytest.mark.parametrize("label", LABELS)
def test_sources_saved(lab: dict[str, LabKernel], label: str) -> None:
    k = lab[label]
    saves = k.read_json("save.json")["saves"]
    assert saves, f"{k.release}: no QEMU in the lab rootfs"
    for s in saves:
        assert s["status"] == "completed", f"{k.release}: QEMU {s['qemu']} could not save: {s}"
        assert s["runstate"] == "prelaunch"


def test_every_pair_was_migrated(lab: dict[str, LabKernel]) -> None:
    for qemu in qemu_versions(lab):
        for s, d in PAIRS:
            real_outcome(lab[s], lab[d], qemu)


@pytest.mark.parametrize(("src", "dst"), PAIRS, ids=[f"{s}-to-{d}" for s, d in PAIRS])
def test_check_migration_predicts_real_outcome(
    lab: dict[str, LabKernel], src: str, dst: str, tmp_path: Path
) -> None:
    problems = []
    for qemu in qemu_versions(lab):
        real = real_outcome(lab[src], lab[dst], qemu)
        rc, text = predict(lab[src], lab[dst], qemu, tmp_path)
        assert rc in (0, 3), f"check-migration exited {rc}: {text}"
        if (rc == 0) != real["accepted"]:
            problems.append(
                f"QEMU {qemu}, {lab[src].release} -> {lab[dst].release}: QEMU"
                f" {'accepted' if real['accepted'] else 'refused'} ({real.get('error') or ''}"
                f" {real.get('stderr') or ''}), check-migration exit {rc}: {text.strip()}"
            )
    assert not problems, "\n".join(problems)


def test_same_kernel_always_migrates(lab: dict[str, LabKernel]) -> None:
    """Control: a kernel accepts its own state, so refusals elsewhere are the kernels' doing."""
    for qemu in qemu_versions(lab):
        for label in LABELS:
            real = real_outcome(lab[label], lab[label], qemu)
            assert real["accepted"], f"{lab[label].release} refused its own state: {real}"


def test_firmware_registers_named(lab: dict[str, LabKernel]) -> None:
    for k in lab.values():
        regs = k.read_json("host.json")["registers"]
        assert cat.fmt_id(cat.PSCI_VERSION) in regs
