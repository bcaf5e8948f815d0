#!/usr/bin/env python3
"""Inside the lab: the stream backend on real KVM, seen by a guest that makes SMCCC calls.

    python3 lab/guest/enforce.py OUTDIR

With every QEMU of the rootfs: a 2-vCPU KVM guest (``-cpu host -S``, the SMCCC probe
``lab/build/probe.bin`` as its kernel) is saved before it ever ran (QMP ``migrate`` to a file);
hvcpolicy reads the stream (``hvcpolicy.stream``), plans each lab policy with the planner
``hvcpolicy start`` uses (``planner.plan_start`` with the guest's registers and the host
snapshot), patches every vCPU, and a fresh QEMU loads it (``-incoming``). A second save of the
loaded, never-run guest tells what KVM holds on each vCPU; then the guest runs: the probe prints
what each vCPU sees, resets the machine, prints again and powers off.

Also: a value the kernel refuses (a bitmap bit outside the host's mask), patched in place, makes
the load fail; the same file with the edit undone loads and runs (the control: the kernel's own
defaults). Results: ``OUTDIR/enforce.json``; the snapshot ``OUTDIR/enforce-host.json``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from migrate import QMP, finish, qemus, wait_migration

from hvcpolicy import catalogue as cat
from hvcpolicy import imagefile, planner
from hvcpolicy.cli.main import main as hvcpolicy_main
from hvcpolicy.policy import load_policy_file
from hvcpolicy.snapshot import load_snapshot

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
PROBE = os.path.join(REPO, "lab", "build", "probe.bin")
POLICIES = os.path.join(HERE, "policies")
WORK = "/tmp/enforce"
VENDOR_HYP_BMAP = 0x6030000000160002
RUN_TIMEOUT = 120.0
LINE = re.compile(
    r"hvcprobe pass=(\d) cpu=(\d) (\w+) ([0-9a-f]+) ([0-9a-f]+) ([0-9a-f]+) ([0-9a-f]+)$"
)


def parse_probe(text: str) -> dict[str, Any]:
    """The probe's serial output as {"passes": {"1": {"0": {CALL: [x0..x3]}}}, "events": [...]}."""
    passes: dict[str, dict[str, dict[str, list[str]]]] = {}
    events = []
    for line in text.splitlines():
        m = LINE.search(line)
        if m:
            p, c, name = m.group(1), m.group(2), m.group(3)
            passes.setdefault(p, {}).setdefault(c, {})[name] = [
                f"0x{m.group(i)}" for i in range(4, 8)
            ]
        elif "hvcprobe " in line:
            events.append(line[line.index("hvcprobe ") + 9 :].strip())
    return {"passes": passes, "events": events}


def fw_json(registers: dict[int, int]) -> dict[str, str]:
    return {cat.fmt_id(r): cat.fmt_value(v) for r, v in sorted(registers.items())}


def per_vcpu(path: str) -> dict[str, dict[str, str]]:
    """Every vCPU's firmware registers as the saved stream carries them (hvcpolicy's reader)."""
    image = imagefile.read_image(path)
    return {str(v.instance_id): fw_json(v.firmware) for v in image.stream.vcpus}


def start_qemu(
    q: dict[str, Any], name: str, extra: list[str], serial: str | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    sock = f"{WORK}/{name}.qmp"
    if os.path.exists(sock):
        os.unlink(sock)
    cmd = [
        q["exe"],
        *q["args"],
        *("-machine", "virt,gic-version=3", "-accel", "kvm", "-cpu", "host"),
        *("-m", "128", "-smp", "2", "-nodefaults", "-display", "none", "-S"),
        *("-kernel", PROBE, "-serial", f"file:{serial}" if serial else "null"),
        *("-qmp", f"unix:{sock},server=on,wait=off"),
        *extra,
    ]
    proc = subprocess.Popen(
        cmd,
        env=q["env"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    return proc, sock


def save_to(qmp: QMP, proc: subprocess.Popen[bytes], path: str) -> dict[str, Any]:
    if os.path.exists(path):
        os.unlink(path)
    qmp.cmd("migrate", uri=f"file:{path}")
    info: dict[str, Any] = wait_migration(qmp, proc)
    return info


def save_source(q: dict[str, Any], path: str) -> dict[str, Any]:
    """A never-run guest, migrated to a file."""
    t = time.monotonic()
    proc, sock = start_qemu(q, "source", [])
    rec: dict[str, Any] = {}
    try:
        qmp = QMP(sock, proc)
        rec["runstate"] = qmp.cmd("query-status")["status"]
        t_save = time.monotonic()
        rec["status"] = save_to(qmp, proc, path).get("status")
        rec["save_seconds"] = round(time.monotonic() - t_save, 2)
        qmp.cmd("quit")
        qmp.close()
    except (RuntimeError, OSError) as e:
        rec["status"] = "error"
        rec["error"] = str(e)
    rec["stderr"] = finish(proc)
    rec["seconds"] = round(time.monotonic() - t, 2)
    return rec


def load_and_run(q: dict[str, Any], name: str, path: str, run: bool) -> dict[str, Any]:
    """Load a stream into a fresh QEMU; when it loads: save it again (what KVM holds, per vCPU)
    and, if ``run``, let the probe run to its power-off and parse what it printed."""
    serial = f"{WORK}/{name}.serial"
    if os.path.exists(serial):
        os.unlink(serial)
    rec: dict[str, Any] = {}
    t = time.monotonic()
    proc, sock = start_qemu(q, name, ["-incoming", "defer"], serial)
    try:
        qmp = QMP(sock, proc)
        t_load = time.monotonic()
        qmp.cmd("migrate-incoming", uri=f"file:{path}")
        info = wait_migration(qmp, proc)
        rec["status"] = info.get("status")
        rec["error"] = info.get("error-desc")
        if rec["status"] == "completed":
            time.sleep(0.3)  # the registers are put after the load: let that fail, if so
            rec["load_seconds"] = round(time.monotonic() - t_load, 2)
            rec["runstate"] = qmp.cmd("query-status")["status"]
            t_back = time.monotonic()
            back = f"{WORK}/{name}-readback.bin"
            rec["readback_status"] = save_to(qmp, proc, back).get("status")
            rec["readback_seconds"] = round(time.monotonic() - t_back, 2)
            if rec["readback_status"] == "completed":
                rec["kvm_holds"] = per_vcpu(back)
                os.unlink(back)
            if run:
                t_run = time.monotonic()
                qmp.cmd("cont")
                try:
                    proc.wait(timeout=RUN_TIMEOUT)
                except subprocess.TimeoutExpired:
                    rec["run_error"] = f"no power-off in {RUN_TIMEOUT:.0f} s"
                rec["run_seconds"] = round(time.monotonic() - t_run, 2)
            else:
                qmp.cmd("quit")
        qmp.close()
    except (RuntimeError, OSError) as e:
        rec.setdefault("status", "error")
        rec["error"] = str(e)
    rec["stderr"] = finish(proc)
    rec["exit"] = proc.returncode
    rec["loaded"] = rec.get("status") == "completed" and rec.get("runstate") in (
        "prelaunch",
        "paused",
    )
    if run and os.path.exists(serial):
        with open(serial, errors="replace") as f:
            text = f.read()
        rec["probe"] = parse_probe(text)
        rec["serial"] = text[-4000:]
    rec["seconds"] = round(time.monotonic() - t, 2)
    return rec


def cli(*argv: str) -> tuple[int, str, str]:
    """``hvcpolicy ARGV`` through its entry point, in this process: the CLI's code without a
    Python start-up and hvcpolicy's imports each time (seconds under nested TCG)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = hvcpolicy_main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def explain(policy_path: str, snapshot: str) -> tuple[int, Any]:
    rc, out, err = cli("explain", "--format", "json", "--policy", policy_path, "--host", snapshot)
    try:
        return rc, json.loads(out)
    except ValueError:
        return rc, {"stdout": out, "stderr": err}


def main() -> int:
    outdir = sys.argv[1]
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    snap_path = os.path.join(outdir, "enforce-host.json")
    t = time.monotonic()
    probe_rc, _, probe_err = cli("host", "probe", "-o", snap_path)
    result: dict[str, Any] = {
        "kernel": platform.release(),
        "host_probe": {"rc": probe_rc, "stderr": probe_err[-2000:]},
        "host_probe_seconds": round(time.monotonic() - t, 2),
        "qemus": {},
    }
    host = load_snapshot(snap_path)
    policies = sorted(p for p in os.listdir(POLICIES) if p.endswith(".yaml"))
    explained = {}
    for name in policies:
        rc, doc = explain(os.path.join(POLICIES, name), snap_path)
        explained[name] = {"rc": rc, "json": doc}
    result["explain"] = explained
    ok = probe_rc == 0
    for version, q in qemus().items():
        qrec: dict[str, Any] = {}
        result["qemus"][version] = qrec
        src = f"{WORK}/source-{version}.bin"
        qrec["save"] = save_source(q, src)
        print(json.dumps({"qemu": version, "save": qrec["save"]}), flush=True)
        if qrec["save"]["status"] != "completed":
            ok = False
            continue
        qrec["stream_bytes"] = os.path.getsize(src)
        t_read = time.monotonic()
        image = imagefile.read_image(src)
        qrec["read_seconds"] = round(time.monotonic() - t_read, 3)
        qrec["saved"] = {str(v.instance_id): fw_json(v.firmware) for v in image.stream.vcpus}
        registers = image.stream.firmware()
        runs: dict[str, Any] = {}
        qrec["policies"] = runs
        for name in policies:
            policy = load_policy_file(os.path.join(POLICIES, name))
            plan = planner.plan_start(policy, registers, host.registers)
            rec: dict[str, Any] = {"plan": plan.to_json()}
            runs[name] = rec
            if not plan.ok:
                continue
            path = f"{WORK}/{version}-{name}.bin"
            shutil.copyfile(src, path)
            t_patch = time.monotonic()
            imagefile.patch_image(path, plan.target)
            rec["patch_seconds"] = round(time.monotonic() - t_patch, 3)
            rec["patched"] = per_vcpu(path)
            rec.update(load_and_run(q, f"{version}-{name}", path, run=True))
            os.unlink(path)
            ok = ok and rec["loaded"]
            print(
                json.dumps({"qemu": version, "policy": name, "loaded": rec["loaded"]}), flush=True
            )
        qrec["refused"] = refused_then_restored(q, version, src)
        ok = ok and qrec["refused"]["restored"]["loaded"]
    with open(os.path.join(outdir, "enforce.json"), "w") as f:
        json.dump(result, f, indent=1)
    return 0 if ok else 1


def refused_then_restored(q: dict[str, Any], version: str, src: str) -> dict[str, Any]:
    """VENDOR_HYP_BMAP with a bit outside the host's mask, patched into the file in place: the
    load must fail. Patch the saved value back: the file is byte for byte the saved guest again,
    and it loads and runs (the control run: the kernel's defaults, as the guest sees them)."""
    with open(src, "rb") as f:
        before = f.read()
    saved = imagefile.read_image(src).stream.firmware()[VENDOR_HYP_BMAP]
    bad = saved | 1 << saved.bit_length()
    imagefile.patch_image(src, {VENDOR_HYP_BMAP: bad})
    rec: dict[str, Any] = {"register": cat.fmt_id(VENDOR_HYP_BMAP), "value": cat.fmt_value(bad)}
    rec["refused"] = load_and_run(q, f"{version}-refused", src, run=False)
    imagefile.patch_image(src, {VENDOR_HYP_BMAP: saved})
    with open(src, "rb") as f:
        rec["identical_after_undo"] = f.read() == before
    rec["restored"] = load_and_run(q, f"{version}-control", src, run=True)
    print(
        json.dumps(
            {
                "qemu": version,
                "refused": rec["refused"]["loaded"],
                "restored": rec["restored"]["loaded"],
            }
        ),
        flush=True,
    )
    return rec


if __name__ == "__main__":
    sys.exit(main())
