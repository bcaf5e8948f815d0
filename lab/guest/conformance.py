#!/usr/bin/env python3
"""Inside the lab: drive this real arm64 KVM kernel through every write rule hvcpolicy models.

    python3 lab/guest/conformance.py OUT.json

Records, case by case, what the kernel answered; tests/lab/ compares that with hvcpolicy.kernel
(and the simulator's profiles) on the host. A case is one KVM_SET_ONE_REG (or GET) with its
circumstances: register, value, the value stored before, whether the VM has run (a real KVM_RUN),
whether the vCPU has PSCI 0.2, whether it was initialized; and the answer: errno name or null,
and what GET reads afterwards.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from hvcpolicy import catalogue as cat
from hvcpolicy import kvm

U64_MAX = (1 << 64) - 1
# Firmware ids no kernel knows (there is no WORKAROUND_4 in mainline), and a wrong-size id.
UNKNOWN_IDS = (
    cat.reg_id(cat.COPROC_FW, 4),
    cat.reg_id(cat.COPROC_FW, 0xFF),
    cat.reg_id(cat.COPROC_FW_FEAT_BMAP, 4),
    cat.reg_id(cat.COPROC_FW_FEAT_BMAP, 0xFF),
    cat.STD_BMAP & ~cat.KVM_REG_SIZE_U64 | 0x0020000000000000,  # STD_BMAP as a u32
    cat.PSCI_VERSION & ~cat.KVM_REG_SIZE_U64 | 0x0020000000000000,
)
PSCI_VALUES = (
    0x0,
    0x1,
    0x2,
    0x3,
    0xFFFF,
    0x10000,
    0x10001,
    0x10002,
    0x10003,
    0x10004,
    0x10005,
    0x1FFFF,
    0x20000,
    0x20001,
    (1 << 32) | 0x10001,
    U64_MAX,
)
HIGH_VALUES = (0x20, 0x40, 0x80, 0x100, 0x1000, 1 << 31, 1 << 32, 1 << 63, U64_MAX)


def h(v: int | None) -> str | None:
    return None if v is None else cat.fmt_value(v)


def subsets(mask: int) -> list[int]:
    return [v for v in range(mask + 1) if v & ~mask == 0]


def values_for(rid: int, fresh: int) -> list[int]:
    kind = cat.kind_of(rid)
    if kind in (cat.Kind.BITMAP, cat.Kind.UNKNOWN_BITMAP):
        reg = cat.REGISTERS.get(rid)
        mask = reg.mask if reg is not None and reg.mask is not None else fresh
        vals = subsets(mask)
        vals += [1 << b for b in range(64) if not mask >> b & 1]  # every bit above the mask
        vals += [mask | 1 << b for b in range(64) if not mask >> b & 1 and b < 8]
        vals.append(U64_MAX)
        return vals
    if kind is cat.Kind.PSCI:
        return list(PSCI_VALUES)
    if kind in (cat.Kind.WORKAROUND, cat.Kind.WORKAROUND2):
        return list(range(0x20)) + list(HIGH_VALUES)
    return sorted({fresh, 0, fresh + 1 & U64_MAX, U64_MAX})


class Recorder:
    def __init__(self) -> None:
        self.cases: list[dict[str, Any]] = []

    def attempt(self, vcpu: kvm.Vcpu, rid: int, value: int, scenario: str) -> None:
        before = self._get(vcpu, rid)
        err: str | None = None
        try:
            vcpu.set(rid, value)
        except kvm.KVMError as e:
            err = e.name
        after = self._get(vcpu, rid)
        self.cases.append(
            {
                "scenario": scenario,
                "op": "set",
                "rid": cat.fmt_id(rid),
                "value": h(value),
                "psci_0_2": vcpu.psci_0_2,
                "vcpu_initialized": vcpu.initialized,
                "vm_has_run": vcpu.vm.has_run,
                "before": h(before),
                "errno": err,
                "after": h(after),
            }
        )

    def read(self, vcpu: kvm.Vcpu, rid: int, scenario: str) -> None:
        err: str | None = None
        value: int | None = None
        try:
            value = vcpu.get(rid)
        except kvm.KVMError as e:
            err = e.name
        self.cases.append(
            {
                "scenario": scenario,
                "op": "get",
                "rid": cat.fmt_id(rid),
                "psci_0_2": vcpu.psci_0_2,
                "vcpu_initialized": vcpu.initialized,
                "vm_has_run": vcpu.vm.has_run,
                "errno": err,
                "after": h(value),
            }
        )

    @staticmethod
    def _get(vcpu: kvm.Vcpu, rid: int) -> int | None:
        try:
            return vcpu.get(rid)
        except kvm.KVMError:
            return None


def main() -> int:
    out = sys.argv[1]
    t0 = time.monotonic()
    rec = Recorder()
    result: dict[str, Any] = {"kernel": platform.release(), "machine": platform.machine()}
    # host probe leaves no fd of its scratch VM open.
    fds_before = set(os.listdir("/proc/self/fd"))
    probed = kvm.probe()
    result["probe_fds_leaked"] = sorted(set(os.listdir("/proc/self/fd")) - fds_before)
    with kvm.KVM() as dev:
        with dev.vm() as vm:
            v = vm.vcpu(psci_0_2=True)
            fresh = kvm.firmware_registers(v)
            result["reg_list_count"] = len(v.reg_list())
        with dev.vm() as vm:
            fresh_no_psci = kvm.firmware_registers(vm.vcpu(psci_0_2=False))
        # Every register a vCPU as QEMU's "-cpu host" makes it (PSCI 0.2 + PMUv3) lists: QEMU
        # migrates all but the core and SVE ones ("cpreg list"), firmware registers among them.
        with dev.vm() as vm:
            try:
                ids = vm.vcpu(features=1 << kvm.KVM_ARM_VCPU_PMU_V3).reg_list()
                result["qemu_vcpu_features"] = "psci-0.2,pmu-v3"
            except kvm.KVMError:
                with dev.vm() as vm2:
                    ids = vm2.vcpu().reg_list()
                result["qemu_vcpu_features"] = "psci-0.2"
            result["reg_list_qemu_vcpu"] = [cat.fmt_id(r) for r in sorted(ids)]
        if probed != fresh:
            raise SystemExit(f"kvm.probe() read {probed}, a second scratch VM {fresh}")
        result["fresh"] = {cat.fmt_id(r): h(x) for r, x in fresh.items()}
        result["fresh_no_psci_0_2"] = {cat.fmt_id(r): h(x) for r, x in fresh_no_psci.items()}
        listed = sorted(fresh)
        every = listed + list(UNKNOWN_IDS)

        # A vCPU before KVM_ARM_VCPU_INIT: every access.
        with dev.vm() as vm:
            raw = vm.vcpu(init=False)
            for rid in every:
                rec.read(raw, rid, "uninitialized")
                rec.attempt(raw, rid, fresh.get(rid, 0), "uninitialized")
            try:
                raw.reg_list()
                result["reg_list_uninitialized"] = None
            except kvm.KVMError as e:
                result["reg_list_uninitialized"] = e.name

        for psci_0_2 in (True, False):
            tag = "psci-0.2" if psci_0_2 else "no-psci-0.2"
            # Fresh reads of ids no kernel lists.
            with dev.vm() as vm:
                vc = vm.vcpu(psci_0_2=psci_0_2)
                for rid in UNKNOWN_IDS:
                    rec.read(vc, rid, f"unknown/{tag}")
                    rec.attempt(vc, rid, 0, f"unknown/{tag}")
                    rec.attempt(vc, rid, 1, f"unknown/{tag}")
            for rid in listed:
                vals = values_for(rid, fresh[rid])
                # Before any KVM_RUN: every value in turn on one VM (what is stored carries on).
                with dev.vm() as vm:
                    vc = vm.vcpu(psci_0_2=psci_0_2)
                    for value in vals:
                        rec.attempt(vc, rid, value, f"before-run/{tag}")
                # After a real KVM_RUN, from each value the VM could have been left with.
                starts = [fresh[rid]]
                if cat.is_bitmap(rid):
                    reg = cat.REGISTERS.get(rid)
                    mask = reg.mask if reg is not None and reg.mask is not None else fresh[rid]
                    starts = subsets(mask)
                for start in starts:
                    with dev.vm() as vm:
                        vc = vm.vcpu(psci_0_2=psci_0_2)
                        if start != fresh[rid]:
                            vc.set(rid, start)
                        reason = vc.run_once()
                        if reason != kvm.KVM_EXIT_MMIO:
                            raise SystemExit(f"KVM_RUN exit reason {reason}, not MMIO")
                        for value in vals:
                            rec.attempt(vc, rid, value, f"after-run/{tag}")
        # Bitmaps and PSCI are per VM: written through vCPU 0, read through vCPU 1.
        per_vm = []
        for rid in listed:
            if not (cat.is_bitmap(rid) or rid == cat.PSCI_VERSION):
                continue
            for value in values_for(rid, fresh[rid])[:4] if cat.is_bitmap(rid) else [0x10000]:
                with dev.vm() as vm:
                    v0, v1 = vm.vcpu(), vm.vcpu()
                    try:
                        v0.set(rid, value)
                    except kvm.KVMError:
                        continue
                    per_vm.append(
                        {"rid": cat.fmt_id(rid), "value": h(value), "vcpu1": h(v1.get(rid))}
                    )
        result["per_vm"] = per_vm
    result["cases"] = rec.cases
    result["seconds"] = round(time.monotonic() - t0, 2)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=0)
    os.replace(tmp, out)
    print(f"conformance: {len(rec.cases)} cases in {result['seconds']} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
