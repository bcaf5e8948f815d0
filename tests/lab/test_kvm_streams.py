"""The lab's real KVM migration streams (lab/build/out/<release>/state-*.bin: QEMU 10.0 and 11.1,
``-cpu host``, 2 vCPUs, never run) read by hvcpolicy.stream: every vCPU's firmware registers are
what the kernel reports, every vCPU of a variant carries the variant's values, a patch reaches
every vCPU in place, and ``check-migration --image`` predicts what QEMU did with each stream."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from hvcpolicy import catalogue as cat
from hvcpolicy.cli.main import main
from hvcpolicy.imagefile import patch_image, read_image
from tests.lab.labdata import LABELS, LabKernel
from tests.lab.test_migration import PAIRS, qemu_versions, real_outcome, saved


def regs(doc: dict[str, str]) -> dict[int, int]:
    return {int(r, 16): int(v, 16) for r, v in doc.items()}


def completed(k: LabKernel) -> list[dict[str, Any]]:
    return [s for s in k.read_json("save.json")["saves"] if s["status"] == "completed"]


@pytest.mark.parametrize("label", LABELS)
def test_every_vcpu_of_every_stream(lab: dict[str, LabKernel], label: str) -> None:
    k = lab[label]
    probed = regs(k.read_json("host.json")["registers"])
    saves = completed(k)
    assert saves, f"{k.release}: no stream saved"
    for rec in saves:
        image = read_image(str(k.out / rec["state"]))
        assert image.kind == "qemu-stream"
        vcpus = image.stream.vcpus
        assert [c.instance_id for c in vcpus] == [0, 1], f"{rec['state']}: not 2 vCPUs"
        want = probed if rec["variant"] == "default" else regs(rec["registers"])
        for c in vcpus:
            assert c.firmware == want, f"{k.release} {rec['state']} vCPU {c.instance_id}"
            assert list(c.registers) == sorted(c.registers)
        # the rest of the list is the kernel's too: core and SVE registers stay out of it
        assert not any(cat.coproc(r) in (0x10, 0x15) for r in vcpus[0].registers)


@pytest.mark.parametrize("label", LABELS)
def test_patch_every_vcpu_of_a_real_stream(
    lab: dict[str, LabKernel], label: str, tmp_path: Path
) -> None:
    k = lab[label]
    for rec in completed(k):
        if rec["variant"] != "default":
            continue
        path = tmp_path / rec["state"]
        shutil.copy(k.out / rec["state"], path)
        before = read_image(str(path))
        fw = before.stream.firmware()
        changes = {cat.PSCI_VERSION: 0x10001}
        for rid in (cat.STD_HYP_BMAP, cat.VENDOR_HYP_BMAP):
            if rid in fw:
                changes[rid] = 0
        after = patch_image(str(path), changes, expect=before)
        assert path.stat().st_size == (k.out / rec["state"]).stat().st_size
        for c in after.stream.vcpus:
            assert c.firmware == {**fw, **changes}
            old = next(x for x in before.stream.vcpus if x.instance_id == c.instance_id)
            assert {r: v for r, v in c.registers.items() if r not in changes} == {
                r: v for r, v in old.registers.items() if r not in changes
            }


def predict_image(state: Path, dst: LabKernel, qemu: str, tmp: Path) -> tuple[int, str]:
    dest = dict(dst.read_json("host.json"))
    dest["qemu"] = qemu
    dest_path = tmp / "dest.json"
    dest_path.write_text(json.dumps(dest))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["check-migration", "--image", str(state), "--to", str(dest_path)])
    return rc, (out.getvalue() + err.getvalue()).strip()


@pytest.mark.parametrize(("src", "dst"), PAIRS, ids=[f"{s}-to-{d}" for s, d in PAIRS])
def test_check_migration_image_predicts_real_outcome(
    lab: dict[str, LabKernel], src: str, dst: str, tmp_path: Path
) -> None:
    problems = []
    for qemu in qemu_versions(lab):
        for rec in saved(lab[src], qemu):
            real = real_outcome(lab[src], lab[dst], qemu, rec["variant"])
            rc, text = predict_image(lab[src].out / rec["state"], lab[dst], qemu, tmp_path)
            assert rc in (0, 3), f"check-migration --image exited {rc}: {text}"
            if (rc == 0) != real["accepted"]:
                problems.append(
                    f"QEMU {qemu}, {lab[src].release} ({rec['variant']}) -> {lab[dst].release}:"
                    f" QEMU {'accepted' if real['accepted'] else 'refused'}"
                    f" [{real.get('error') or ''} {real['stderr']}]; exit {rc} [{text}]"
                )
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("label", LABELS)
def test_image_show_on_a_real_stream(lab: dict[str, LabKernel], label: str) -> None:
    k = lab[label]
    rec = next(r for r in completed(k) if r["variant"] == "default")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["image", "show", str(k.out / rec["state"])])
    assert rc == 0
    text = out.getvalue()
    assert "QEMU migration stream, 2 vCPU(s)" in text
    psci = regs(k.read_json("host.json")["registers"])[cat.PSCI_VERSION]
    assert f"PSCI: the guest sees {cat.psci_text(psci)}" in text
