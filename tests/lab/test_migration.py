"""`hvcpolicy check-migration` held to real QEMU-on-KVM migrations between the lab's kernels.

For each QEMU of the lab's rootfs and each ordered pair of lab kernels (and each kernel to
itself, as a control), the lab started a KVM guest with ``-S`` on the source kernel, migrated it
to a file on the share, and loaded it with ``-incoming`` on the destination kernel
(lab/guest/migrate.py). Besides the kernel's defaults it migrates variants of each stream with
firmware values patched as a policy would have left them (PSCI pinned to 1.1;
VENDOR_HYP_BMAP_2 with both bits set).

Two streams per case are loaded:
- ``firmware``: the destination's own stream with the source's firmware registers transplanted
  into it. Everything else is the destination's, so QEMU's and the kernel's verdict is about the
  firmware registers alone: exactly what check-migration answers. Every verdict must match.
- ``full``: the source's stream as it is. Between different kernels QEMU also refuses for
  registers hvcpolicy does not govern (system and demux registers a kernel lacks, ID and cache
  geometry values the destination will not take, QEMU < 11.1's register count check). Those
  refusals must name such a register; a full stream QEMU takes while its firmware transplant is
  refused is only QEMU < 11.1 dropping an id above the destination's largest (see LAB.md).
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


def qemu_versions(lab: dict[str, LabKernel]) -> list[str]:
    versions: set[str] = set()
    for k in lab.values():
        versions |= {s["qemu"] for s in k.read_json("save.json")["saves"]}
    return sorted(versions)


def saved(src: LabKernel, qemu: str) -> list[dict[str, Any]]:
    return [s for s in src.read_json("save.json")["saves"] if s["qemu"] == qemu]


def real_outcome(
    src: LabKernel, dst: LabKernel, qemu: str, variant: str, stream: str = "firmware"
) -> dict[str, Any]:
    for rec in dst.read_json("load.json")["loads"]:
        if (rec["source"], rec["qemu"], rec["variant"], rec["stream"]) == (
            src.release,
            qemu,
            variant,
            stream,
        ):
            return dict(rec)
    raise AssertionError(
        f"no {stream} migration {src.release} ({variant}) -> {dst.release} with QEMU {qemu}"
    )


# What QEMU says when it refuses a stream for a register hvcpolicy does not govern.
NON_FIRMWARE = re.compile(
    r"system register op0|demuxed reg|cpreg_vmstate_array_len|load of migration failed:"
    r" Operation not permitted"
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
            if rec["stream"] != "full":
                continue
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
                real_outcome(lab[s], lab[d], qemu, rec["variant"], "full")


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
            if (rc == 0) != real["accepted"]:
                problems.append(
                    f"QEMU {qemu}, {lab[src].release} ({variant}) -> {lab[dst].release}:"
                    f" QEMU {'accepted' if real['accepted'] else 'refused'}"
                    f" [{(real.get('error') or '')} {real['stderr']}];"
                    f" check-migration exit {rc} [{text}]"
                )
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(("src", "dst"), PAIRS, ids=[f"{s}-to-{d}" for s, d in PAIRS])
def test_full_stream_differs_only_for_named_reasons(
    lab: dict[str, LabKernel], src: str, dst: str
) -> None:
    problems = []
    for qemu in qemu_versions(lab):
        for rec in saved(lab[src], qemu):
            fw = real_outcome(lab[src], lab[dst], qemu, rec["variant"])
            full = real_outcome(lab[src], lab[dst], qemu, rec["variant"], "full")
            case = f"QEMU {qemu}, {lab[src].release} ({rec['variant']}) -> {lab[dst].release}"
            if fw["accepted"] and not full["accepted"] and not NON_FIRMWARE.search(full["stderr"]):
                problems.append(f"{case}: full stream refused for no named reason: {full}")
            if full["accepted"] and not fw["accepted"]:
                version = qemu_version(qemu)
                assert version is not None
                if version >= (11, 1, 0) or "cpreg_vmstate_array_len" not in fw["stderr"]:
                    problems.append(f"{case}: full stream accepted, firmware refused: {fw}")
    assert not problems, "\n".join(problems)


def test_same_kernel_always_migrates(lab: dict[str, LabKernel]) -> None:
    """Control: a kernel accepts its own state, so refusals elsewhere are the kernels' doing."""
    for qemu in qemu_versions(lab):
        for label in LABELS:
            for stream in ("firmware", "full"):
                real = real_outcome(lab[label], lab[label], qemu, "default", stream)
                assert real["accepted"], f"{lab[label].release} refused its own state: {real}"
