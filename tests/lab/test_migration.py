"""`hvcpolicy check-migration` held to real QEMU-on-KVM migrations between the lab's kernels.

For each QEMU of the lab's rootfs and each ordered pair of lab kernels (and each kernel to
itself, as a control), the lab started a KVM guest with ``-S`` on the source kernel, migrated it
to a file on the share, and loaded that file with ``-incoming`` on the destination kernel
(lab/guest/migrate.py). Besides the kernel's defaults, it loads variants of the same stream with
firmware values patched as a policy would have left them (PSCI pinned to 1.1; VENDOR_HYP_BMAP_2
with both bits set). hvcpolicy is asked the same question from the firmware registers the stream
carries, as ``<hvc:applied>``, and the destination's probed snapshot with that QEMU's version.

QEMU also refuses streams for reasons that are not firmware registers: a system or demux
(CCSIDR) register of the source that the destination kernel does not list, or, before QEMU 11.1,
more registers in the stream than the destination has. hvcpolicy does not model those (they are
the same for every policy); ``structural_refusal`` below does, from the register list a vCPU
configured as QEMU's ``-cpu host`` shows on each kernel, and is held to the real outcome too.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest

from hvcpolicy import catalogue as cat
from hvcpolicy.cli.main import main
from hvcpolicy.snapshot import qemu_version
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
CORE, SVE = 0x0010, 0x0015  # coprocs QEMU keeps out of its cpreg list


def cpregs(k: LabKernel) -> list[int]:
    """The ids QEMU migrates for a -cpu host vCPU on this kernel (sorted)."""
    ids = [int(r, 16) for r in k.read_json("conformance.json")["reg_list_qemu_vcpu"]]
    return sorted(r for r in ids if cat.coproc(r) not in (CORE, SVE))


def structural_refusal(src: LabKernel, dst: LabKernel, qemu: str) -> str | None:
    """Why QEMU refuses the stream for its non-firmware registers alone; None when it does not.

    Before 11.1 (target/arm/machine.c): more incoming registers than the destination has fails
    the load; then both sorted lists are walked and an incoming id below the destination's
    current one fails it; incoming ids above the destination's largest are never looked at.
    From 11.1: any incoming id the destination does not list fails it (firmware ones aside).
    """
    s_ids, d_ids = cpregs(src), cpregs(dst)
    version = qemu_version(qemu)
    assert version is not None
    nonfw = [r for r in s_ids if not cat.is_firmware_reg(r)]
    if version < (11, 1, 0):
        if len(s_ids) > len(d_ids):
            return f"{len(s_ids)} registers in the stream, destination has {len(d_ids)}"
        v = 0
        for rid in d_ids:
            if v >= len(s_ids):
                break
            if s_ids[v] > rid:
                continue
            if s_ids[v] < rid:
                if cat.is_firmware_reg(s_ids[v]):
                    return None  # a firmware register: hvcpolicy's part
                return f"register {cat.fmt_id(s_ids[v])} unknown on the destination"
            v += 1
        return None
    missing = [r for r in nonfw if r not in set(d_ids)]
    if missing:
        return f"registers unknown on the destination: {', '.join(map(cat.fmt_id, missing))}"
    return None


def qemu_versions(lab: dict[str, LabKernel]) -> list[str]:
    versions: set[str] = set()
    for k in lab.values():
        versions |= {s["qemu"] for s in k.read_json("save.json")["saves"]}
    return sorted(versions)


def saved(src: LabKernel, qemu: str) -> list[dict[str, Any]]:
    return [s for s in src.read_json("save.json")["saves"] if s["qemu"] == qemu]


def real_outcome(src: LabKernel, dst: LabKernel, qemu: str, variant: str) -> dict[str, Any]:
    for rec in dst.read_json("load.json")["loads"]:
        if rec["source"] == src.release and rec["qemu"] == qemu and rec["variant"] == variant:
            return dict(rec)
    raise AssertionError(
        f"no migration {src.release} ({variant}) -> {dst.release} with QEMU {qemu} recorded"
    )


def predict(
    src: LabKernel, registers: dict[str, str], dst: LabKernel, qemu: str, tmp: Path
) -> tuple[int, str]:
    source = src.read_json("host.json")
    regs = "\n".join(
        f'        <hvc:register id="{rid}" value="{value}"/>' for rid, value in registers.items()
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
    return rc, (out.getvalue() + err.getvalue()).strip()


@pytest.mark.parametrize("label", LABELS)
def test_sources_saved(lab: dict[str, LabKernel], label: str) -> None:
    k = lab[label]
    saves = k.read_json("save.json")["saves"]
    assert saves, f"{k.release}: no QEMU in the lab rootfs"
    probed = k.read_json("host.json")["registers"]
    for s in saves:
        assert s["status"] == "completed", f"{k.release}: QEMU {s['qemu']} could not save: {s}"
        assert s["runstate"] == "prelaunch"
        if s["variant"] == "default":
            assert s["registers"] == probed, "QEMU migrates other firmware values than probed"


@pytest.mark.parametrize("label", LABELS)
def test_cpreg_count_matches_qemu(lab: dict[str, LabKernel], label: str) -> None:
    """The cpreg model counts what QEMU counts (QEMU < 11.1 names its own count on a refusal)."""
    k = lab[label]
    mine = len(cpregs(k))
    seen = 0
    for other in lab.values():
        for rec in other.read_json("load.json")["loads"]:
            m = re.search(r"Invalid value (\d+) expecting positive value <= (\d+)", rec["stderr"])
            if not m:
                continue
            if rec["source"] == k.release:
                assert int(m.group(1)) == mine, rec["stderr"]
                seen += 1
            if other.release == k.release:
                assert int(m.group(2)) == mine, rec["stderr"]
                seen += 1
    assert seen or len({len(cpregs(x)) for x in lab.values()}) == 1


def test_every_pair_was_migrated(lab: dict[str, LabKernel]) -> None:
    for qemu in qemu_versions(lab):
        for s, d in PAIRS:
            for rec in saved(lab[s], qemu):
                real_outcome(lab[s], lab[d], qemu, rec["variant"])


@pytest.mark.parametrize(("src", "dst"), PAIRS, ids=[f"{s}-to-{d}" for s, d in PAIRS])
def test_check_migration_predicts_real_outcome(
    lab: dict[str, LabKernel], src: str, dst: str, tmp_path: Path
) -> None:
    problems = []
    for qemu in qemu_versions(lab):
        for rec in saved(lab[src], qemu):
            variant = rec["variant"]
            real = real_outcome(lab[src], lab[dst], qemu, variant)
            rc, text = predict(lab[src], rec["registers"], lab[dst], qemu, tmp_path)
            assert rc in (0, 3), f"check-migration exited {rc}: {text}"
            structural = structural_refusal(lab[src], lab[dst], qemu)
            predicted = rc == 0 and structural is None
            if predicted != real["accepted"]:
                problems.append(
                    f"QEMU {qemu}, {lab[src].release} ({variant}) -> {lab[dst].release}:"
                    f" QEMU {'accepted' if real['accepted'] else 'refused'}"
                    f" [{(real.get('error') or '')} {real['stderr']}];"
                    f" check-migration exit {rc} [{text}];"
                    f" non-firmware registers: {structural or 'compatible'}"
                )
    assert not problems, "\n".join(problems)


def test_same_kernel_always_migrates(lab: dict[str, LabKernel]) -> None:
    """Control: a kernel accepts its own state, so refusals elsewhere are the kernels' doing."""
    for qemu in qemu_versions(lab):
        for label in LABELS:
            real = real_outcome(lab[label], lab[label], qemu, "default")
            assert real["accepted"], f"{lab[label].release} refused its own state: {real}"
