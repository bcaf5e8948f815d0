#!/usr/bin/env python3
"""Boot the lab's arm64 kernels under TCG and run, inside each, what the lab proves.

    python3 lab/run.py                  # build if needed, then every phase on every kernel
    python3 lab/run.py --phase probe    # host probe + conformance + migration sources
    python3 lab/run.py --phase alt-cpu  # probe + conformance again on a cortex-a72 (nVHE, WA 0/0/0)
    python3 lab/run.py --phase migrate  # each kernel as the destination of every saved state
    python3 lab/run.py --phase enforce  # the stream backend seen by the SMCCC probe guest,
                                        # by QMP and through libvirtd (hvcpolicy start)
    python3 lab/run.py --kernel 6.1.0-50-arm64 --phase probe

The checkout is shared with the guest over 9p (mount tag host0, at /mnt/host); a job script under
lab/build/jobs/ says what to run; results land in lab/build/out/<kernel release>/:
  host.json         what ``hvcpolicy host probe`` wrote (probe.rc, probe.out beside it)
  conformance.json  every case of lab/guest/conformance.py with the kernel's answer
  save.json, state-<qemu>.bin   a KVM guest started with -S, migrated to a file, per QEMU
  load.json         every saved state loaded with -incoming on this kernel, and QEMU's verdict
  console-<phase>.log  the serial console
  cpu-cortex-a72/   host.json and conformance.json again, the host CPU a cortex-a72
  enforce.json      per QEMU and lab policy: plan, patched stream, what KVM held, what the probe saw
  libvirt.json      the probe domain started through libvirtd with the policy, and its live XML
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

LAB = Path(__file__).resolve().parent
REPO = LAB.parent
BUILD = LAB / "build"
OUT = BUILD / "out"
CPU = os.environ.get("HVCLAB_CPU", "neoverse-n1")
# A second CPU for the conformance run: an ARMv8.0 core without VHE (KVM in nVHE mode) whose
# mitigation levels are all 0 (NOT_AVAIL), where the N1's are 2/0/1.
ALT_CPU = "cortex-a72"
BOOT_TIMEOUT = 900

JOB_HEAD = """set -u
cd /mnt/host
export PYTHONDONTWRITEBYTECODE=1 PYTHONPATH=/mnt/host
O=lab/build/out/$(uname -r)
echo "lab-$(uname -r | cut -d- -f1)" >/proc/sys/kernel/hostname
mkdir -p $O
"""
JOBS = {
    "probe": """
python3 -m hvcpolicy host probe -o $O/host.json >$O/probe.out 2>&1; echo $? >$O/probe.rc
python3 lab/guest/conformance.py $O/conformance.json >$O/conformance.out 2>&1
echo $? >$O/conformance.rc
python3 lab/guest/migrate.py save $O >$O/save.out 2>&1; echo $? >$O/save.rc
""",
    "alt-cpu": f"""
O=$O/cpu-{ALT_CPU}
mkdir -p $O
python3 -m hvcpolicy host probe -o $O/host.json >$O/probe.out 2>&1; echo $? >$O/probe.rc
python3 lab/guest/conformance.py $O/conformance.json >$O/conformance.out 2>&1
echo $? >$O/conformance.rc
""",
    "migrate": """
python3 lab/guest/migrate.py load lab/build/out $O >$O/load.out 2>&1; echo $? >$O/load.rc
""",
    # One boot for both (a boot costs ~10 s): the stream backend by QMP, then through libvirtd.
    "enforce": """
python3 lab/guest/enforce.py $O >$O/enforce.out 2>&1; echo $? >$O/enforce.rc
python3 lab/guest/libvirt_start.py $O >$O/libvirt.out 2>&1; echo $? >$O/libvirt.rc
""",
}
# What each phase leaves (removed before it boots, so a failed boot never passes for a done one).
STALE = {
    "probe": ("probe.rc", "conformance.rc", "save.rc"),
    "alt-cpu": (f"cpu-{ALT_CPU}/probe.rc", f"cpu-{ALT_CPU}/conformance.rc"),
    "migrate": ("load.rc",),
    "enforce": ("enforce.rc", "enforce.json", "libvirt.rc", "libvirt.json"),
}


def kernels() -> list[dict[str, str]]:
    path = BUILD / "kernels.json"
    if not path.exists():
        raise SystemExit("lab-run: no lab/build/kernels.json: run python3 lab/build.py")
    data: list[dict[str, str]] = json.loads(path.read_text())
    return data


def boot(release: str, phase: str) -> float:
    kdir = BUILD / "kernels" / release
    out = OUT / release
    out.mkdir(parents=True, exist_ok=True)
    jobs = BUILD / "jobs"
    jobs.mkdir(exist_ok=True)
    job = jobs / f"{phase}.sh"
    job.write_text(JOB_HEAD + JOBS[phase])
    for name in STALE[phase]:
        (out / name).unlink(missing_ok=True)
    cmd = [
        "qemu-system-aarch64",
        "-machine",
        "virt,virtualization=on,gic-version=3",
        "-cpu",
        ALT_CPU if phase == "alt-cpu" else CPU,
        "-smp",
        "2",
        "-m",
        "3072",
        "-accel",
        "tcg,thread=multi",
        "-nographic",
        "-no-reboot",
        "-nic",
        "none",
        "-kernel",
        str(kdir / "vmlinuz"),
        "-initrd",
        str(kdir / "initrd.img"),
        "-append",
        f"console=ttyAMA0 rdinit=/init quiet panic=-1 hvclab.script={job.relative_to(REPO)}",
        "-virtfs",
        f"local,path={REPO},mount_tag=host0,security_model=none,id=host0",
    ]
    t = time.monotonic()
    with open(out / f"console-{phase}.log", "wb") as console:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=console, stderr=console)
        try:
            proc.wait(timeout=BOOT_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise SystemExit(
                f"lab-run: {release} {phase}: no power-off in {BOOT_TIMEOUT} s"
            ) from None
    took = time.monotonic() - t
    print(f"lab-run: {release} {phase}: {took:.0f} s", flush=True)
    return took


# What each phase's answers depend on: when none of it changed, --if-stale reuses them. A
# directory stands for every file under it. migrate loads what every probe boot saved, so it
# depends on everything probe does.
COMMON = ("lab/build.py", "lab/run.py")
PROBE_INPUTS = (
    "lab/guest/conformance.py",
    "lab/guest/migrate.py",
    "hvcpolicy/kvm.py",
    "hvcpolicy/cli/host.py",
    "hvcpolicy/snapshot.py",
)
# The enforce phase runs hvcpolicy itself (planner, stream, explain, start, the hook).
ENFORCE_INPUTS = ("lab/guest/smccc", "lab/guest/policies", "lab/guest/migrate.py", "hvcpolicy")
INPUTS = {
    "probe": PROBE_INPUTS,
    "alt-cpu": PROBE_INPUTS,
    "migrate": PROBE_INPUTS,
    "enforce": ("lab/guest/enforce.py", "lab/guest/libvirt_start.py", *ENFORCE_INPUTS),
}


def inputs_digest(phase: str) -> str:
    h = hashlib.sha256()
    for rel in (*COMMON, *INPUTS[phase]):
        path = REPO / rel
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            if "__pycache__" in f.parts:
                continue
            h.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def done_before(build_id: str) -> dict[str, Any]:
    """The phases an earlier run of this very build completed on every kernel:
    {phase: {"digest", "boots"}}."""
    try:
        done = json.loads((OUT / "timings.json").read_text())
    except (OSError, ValueError):
        return {}
    if done.get("cpu") != CPU or done.get("build") != build_id:
        return {}
    phases = done.get("phases")
    return phases if isinstance(phases, dict) else {}


def write_done(phases: dict[str, Any], build_id: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    complete = all(isinstance(phases.get(p), dict) for p in JOBS)
    doc = {"cpu": CPU, "build": build_id, "complete": complete, "phases": phases}
    (OUT / "timings.json").write_text(json.dumps(doc, indent=1) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--phase", choices=(*JOBS, "all"), default="all")
    ap.add_argument("--kernel", action="append", help="kernel release (default: every one)")
    ap.add_argument("--no-build", action="store_true", help="do not run lab/build.py first")
    ap.add_argument(
        "--if-stale",
        action="store_true",
        help="do nothing when a complete run of these very lab inputs already left its answers",
    )
    args = ap.parse_args()
    BUILD.mkdir(exist_ok=True)
    # One lab at a time on this checkout: a second run waits (it then usually finds it done).
    with open(BUILD / ".run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return locked(args)


def locked(args: argparse.Namespace) -> int:
    phases = tuple(JOBS) if args.phase == "all" else (args.phase,)
    if not args.no_build:
        subprocess.run([sys.executable, str(LAB / "build.py")], check=True)
    releases = [k["release"] for k in kernels()]
    if args.kernel:
        unknown = set(args.kernel) - set(releases)
        if unknown:
            raise SystemExit(f"lab-run: not a lab kernel: {', '.join(sorted(unknown))}")
        releases = [r for r in releases if r in args.kernel]
    # A rebuilt lab (other kernels, rootfs or probe) invalidates every earlier answer.
    parts = ("kernels.json", "rootfs.stamp", "libvirt.stamp", "wheels.stamp", "probe.bin")
    missing = [p for p in parts if not (BUILD / p).exists()]
    if missing:
        raise SystemExit(f"lab-run: lab/build lacks {', '.join(missing)}: run python3 lab/build.py")
    build_id = hashlib.sha256(b"".join((BUILD / p).read_bytes() for p in parts)).hexdigest()
    done = done_before(build_id)
    todo = []
    for phase in phases:
        digest = inputs_digest(phase)
        prev = done.get(phase)
        fresh = isinstance(prev, dict) and prev.get("digest") == digest
        # migrate loads what the probe boots save: new saves need new loads.
        if phase == "migrate" and "probe" in [p for p, _ in todo]:
            fresh = False
        if args.if_stale and fresh:
            print(f"lab-run: {phase}: up to date with its inputs, answers reused", flush=True)
            continue
        done.pop(phase, None)
        todo.append((phase, digest))
    for phase, digest in todo:
        boots = {release: round(boot(release, phase), 1) for release in releases}
        # Only a phase that ran on every kernel can be reused later.
        if not args.kernel:
            done[phase] = {"digest": digest, "boots": boots}
        write_done(done, build_id)
    write_done(done, build_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
