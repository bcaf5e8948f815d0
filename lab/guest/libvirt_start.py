#!/usr/bin/env python3
"""Inside the lab: a real libvirtd on real KVM, the hvcpolicy hook installed, and the SMCCC probe
started under a policy (../shared/reference/arm64-kvm-lab-libvirt.md has the recipe).

    python3 lab/guest/libvirt_start.py OUTDIR

No systemd in the lab: the job mounts devpts and /dev/shm, gives /dev/kvm to group kvm, starts
virtlogd and libvirtd itself, takes the host snapshot (``hvcpolicy host probe``), installs the
hook (``hvcpolicy install-hook``), defines the probe domain for each QEMU of the rootfs (11.1
through a wrapper script) and attaches it to the lab policy ``lab-pinned`` (``hvcpolicy attach``).
Each domain is then started with the policy enforced on a stock QEMU (``START``):

- ``hvcpolicy`` (the default): ``hvcpolicy start DOMAIN``, in its own process, as an operator runs
  it (save the never-run guest, patch every vCPU, restore paused, read back, resume);
- ``virsh``: the same cycle by hand, as ``../shared/reference/arm64-kvm-lab-libvirt.md`` §4 ran it
  before ``hvcpolicy start`` could, with hvcpolicy's planner and image patcher: ``virsh start
  --paused``, ``virsh save --paused`` (sparse for QEMU >= 11, whose ``fd:`` restore of a raw
  image is gone), patch every vCPU, ``virsh restore --paused --xml`` with ``<hvc:applied>``,
  ``virsh resume``. Kept to time the bare cycle against ``hvcpolicy start``.

The domain runs ``probe-hold.bin``, which stays up after its last line, so the live XML can be
read once the probe is done; then the job destroys the domain.

Results: ``OUTDIR/libvirt.json``: per QEMU, each step's time, the probe's output parsed, the
live XML's ``<hvc:policy>`` element, and the hook's audit lines.
"""

from __future__ import annotations

import contextlib
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
import libvirt
from enforce import cli, fw_json, parse_probe
from migrate import qemus

from hvcpolicy import domainxml, imagefile, planner
from hvcpolicy.domainxml import Applied, render_policy, with_applied
from hvcpolicy.policy import load_policy
from hvcpolicy.snapshot import load_snapshot

# How the domains are started: "hvcpolicy" (hvcpolicy start) or "virsh" (the same cycle by hand).
START = "hvcpolicy"
POLICY = "lab-pinned"
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
# The probe that stays up after its last line: libvirt's qemu driver cannot preserve a domain
# that powered off, and the live XML is what this job looks at.
PROBE = os.path.join(REPO, "lab", "build", "probe-hold.bin")
IMAGES = "/var/lib/libvirt/images"
SAVE_DIR = "/var/lib/hvcpolicy-lab/save"
POLICY_DIR = "/etc/hvcpolicy/policies"
SNAPSHOT = "/var/lib/hvcpolicy/host.json"
AUDIT = "/var/log/hvcpolicy-lab-audit.log"
SERIAL = "/var/log/libvirt/qemu/{name}.serial"
URI = "qemu:///system"
HVCPOLICY = (sys.executable, "-m", "hvcpolicy")
# hvcpolicy's element in a domain's <metadata>, whatever prefix libvirt gives it.
POLICY_ELEMENT = re.compile(r"<(\w+):policy\b.*?</\1:policy>|<\w+:policy\b[^>]*/>", re.S)

DOMAIN = """<domain type='kvm'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>2</vcpu>
  <os><type arch='aarch64' machine='virt'>hvm</type><kernel>{kernel}</kernel></os>
  <features><gic version='3'/></features>
  <cpu mode='host-passthrough'/>
  <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <emulator>{emulator}</emulator>
    <controller type='usb' model='none'/>
    <serial type='file'><source path='{serial}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""

WRAPPER = """#!/bin/sh
# QEMU {version} unpacked beside the rootfs's own (lab/build.py): its modules and firmware.
export QEMU_MODULE_DIR={modules}
exec {exe} {args} "$@"
"""


def sh(*cmd: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, input=stdin)
    if check and proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc


def virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh("virsh", "-c", URI, *args, check=check)


def timed(steps: dict[str, float], name: str, fn: Any, *args: Any, **kw: Any) -> Any:
    t = time.monotonic()
    try:
        return fn(*args, **kw)
    finally:
        steps[name] = round(time.monotonic() - t, 2)


def setup(steps: dict[str, float]) -> libvirt.virConnect:
    """The system pieces a distribution's units would provide, then the daemons and the hook."""
    for d in ("/dev/pts", "/dev/shm"):
        os.makedirs(d, exist_ok=True)
    sh("mount", "-t", "devpts", "devpts", "/dev/pts", check=False)
    sh("mount", "-t", "tmpfs", "shm", "/dev/shm", check=False)
    sh("chgrp", "kvm", "/dev/kvm")
    os.chmod("/dev/kvm", 0o660)
    os.makedirs(IMAGES, exist_ok=True)
    shutil.copyfile(PROBE, os.path.join(IMAGES, "probe.bin"))
    os.chmod(os.path.join(IMAGES, "probe.bin"), 0o644)
    os.makedirs("/var/log/libvirt/qemu", exist_ok=True)
    os.makedirs(POLICY_DIR, exist_ok=True)
    shutil.copyfile(os.path.join(HERE, "policies", f"{POLICY}.yaml"), f"{POLICY_DIR}/{POLICY}.yaml")
    os.makedirs(os.path.dirname(SNAPSHOT), exist_ok=True)
    timed(steps, "host_probe", hvcpolicy, "host", "probe", "-o", SNAPSHOT)
    timed(steps, "virtlogd", sh, "/usr/sbin/virtlogd", "-d")
    timed(steps, "libvirtd", sh, "/usr/sbin/libvirtd", "-d")
    conn: libvirt.virConnect = timed(steps, "libvirtd_first_answer", wait_libvirtd)
    timed(
        steps,
        "install_hook",
        hvcpolicy,
        "install-hook",
        *("--policy-dir", POLICY_DIR, "--host-snapshot", SNAPSHOT, "--audit-file", AUDIT),
    )
    return conn


def hvcpolicy(*argv: str) -> str:
    """An hvcpolicy command, in this process (enforce.cli); its stdout, or RuntimeError."""
    rc, out, err = cli(*argv)
    if rc:
        raise RuntimeError(f"hvcpolicy {' '.join(argv)}: exit {rc}: {err.strip()}")
    return out


def wait_libvirtd() -> libvirt.virConnect:
    """libvirtd's first answer: it comes once the qemu driver probed the QEMU binaries."""
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # no retry noise on stderr
    deadline = time.monotonic() + 90
    while True:
        try:
            return libvirt.open(URI)
        except libvirt.libvirtError:
            if time.monotonic() > deadline:
                raise RuntimeError("libvirtd did not answer in 90 s") from None
            time.sleep(0.2)


def emulator(version: str, q: dict[str, Any]) -> str:
    if not q["args"]:
        return str(q["exe"])
    path = f"/usr/local/bin/qemu-system-aarch64-{version}"
    with open(path, "w") as f:
        f.write(
            WRAPPER.format(
                version=version,
                modules=q["env"]["QEMU_MODULE_DIR"],
                exe=q["exe"],
                args=" ".join(q["args"]),
            )
        )
    os.chmod(path, 0o755)
    return path


def define(conn: libvirt.virConnect, name: str, exe: str, steps: dict[str, float]) -> None:
    xml = DOMAIN.format(
        name=name,
        kernel=os.path.join(IMAGES, "probe.bin"),
        emulator=exe,
        serial=SERIAL.format(name=name),
    )
    timed(steps, "define", conn.defineXML, xml)
    timed(steps, "attach", hvcpolicy, "attach", name, "--policy", POLICY)


def state(name: str) -> str:
    return virsh("domstate", name, "--reason", check=False).stdout.strip()


def wait_probe(conn: libvirt.virConnect, name: str, timeout: float = 120.0) -> str:
    """Until the probe printed its last line (or the domain went away)."""
    serial = SERIAL.format(name=name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(serial):
            with open(serial, errors="replace") as f:
                text = f.read()
            if "hvcprobe done" in text or "hvcprobe error" in text:
                return state(name)
        if not conn.lookupByName(name).isActive():
            return state(name)
        time.sleep(0.1)
    return f"timeout: {state(name)}"


def start_hvcpolicy(name: str, steps: dict[str, float], rec: dict[str, Any]) -> None:
    """``hvcpolicy start DOMAIN`` as an operator runs it (its own process)."""
    cmd = (*HVCPOLICY, "start", name, "--host-snapshot", SNAPSHOT)
    proc = timed(steps, "hvcpolicy_start", sh, *cmd, check=False)
    rec["start"] = {"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}
    if proc.returncode:
        raise RuntimeError(f"hvcpolicy start {name}: exit {proc.returncode}: {proc.stderr}")


def start_virsh(name: str, version: str, steps: dict[str, float], rec: dict[str, Any]) -> None:
    """hvcpolicy start's cycle by hand: its planner and image patcher, virsh for the rest."""
    os.makedirs(SAVE_DIR, mode=0o700, exist_ok=True)
    image_path = f"{SAVE_DIR}/{name}.sav"
    if os.path.exists(image_path):
        os.unlink(image_path)
    sparse = tuple(int(x) for x in version.split(".")[:2]) >= (11, 0)
    timed(steps, "start_paused", virsh, "start", name, "--paused")
    fmt = ["--image-format", "sparse"] if sparse else []
    timed(steps, "save", virsh, "save", name, image_path, "--paused", *fmt)
    t = time.monotonic()
    image = imagefile.read_image(image_path)
    policy = load_policy(POLICY, POLICY_DIR)
    host = load_snapshot(SNAPSHOT)
    plan = planner.plan_start(policy, image.stream.firmware(), host.registers)
    rec["plan"] = plan.to_json()
    rec["image"] = {"kind": image.kind, "bytes": os.path.getsize(image_path)}
    if not plan.ok:
        raise RuntimeError(f"plan refused: {plan.refusals}")
    after = imagefile.patch_image(image_path, plan.target, expect=image)
    rec["patched"] = {str(v.instance_id): fw_json(v.firmware) for v in after.stream.vcpus}
    steps["read_plan_patch"] = round(time.monotonic() - t, 3)
    xml = timed(steps, "dumpxml", virsh, "save-image-dumpxml", image_path, "--security-info").stdout
    meta = domainxml.parse_domain(xml.encode(), image_path).meta
    assert meta is not None, "the saved XML lost its <hvc:policy>"
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    done = Applied(host=host.host, kernel=host.kernel, at=stamp, registers=dict(plan.target))
    element = render_policy(with_applied(meta, done))
    xml = POLICY_ELEMENT.sub(lambda _: element, xml, count=1)
    restore_xml = f"/tmp/{name}-restore.xml"
    with open(restore_xml, "w") as f:
        f.write(xml)
    timed(steps, "restore_paused", virsh, "restore", image_path, "--paused", "--xml", restore_xml)
    rec["state_after_restore"] = state(name)
    os.unlink(image_path)
    timed(steps, "resume", virsh, "resume", name)


def run_domain(conn: libvirt.virConnect, version: str, q: dict[str, Any]) -> dict[str, Any]:
    name = "probe-" + version.replace(".", "-")
    steps: dict[str, float] = {}
    rec: dict[str, Any] = {"domain": name, "mode": START, "steps": steps}
    serial = SERIAL.format(name=name)
    try:
        define(conn, name, emulator(version, q), steps)
        if os.path.exists(serial):
            os.unlink(serial)
        t = time.monotonic()
        if START == "hvcpolicy":
            start_hvcpolicy(name, steps, rec)
        else:
            start_virsh(name, version, steps, rec)
        rec["final_state"] = timed(steps, "probe_run", wait_probe, conn, name)
        steps["whole_start"] = round(time.monotonic() - t, 2)
        m = POLICY_ELEMENT.search(conn.lookupByName(name).XMLDesc(0))
        rec["live_policy"] = m.group(0) if m else None
    except (RuntimeError, OSError, AssertionError, libvirt.libvirtError) as e:
        rec["error"] = str(e)
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.lookupByName(name).destroy()
    if os.path.exists(serial):
        with open(serial, errors="replace") as f:
            text = f.read()
        rec["probe"] = parse_probe(text)
        rec["serial"] = text[-4000:]
    return rec


def main() -> int:
    outdir = sys.argv[1]
    steps: dict[str, float] = {}
    result: dict[str, Any] = {"kernel": platform.release(), "mode": START, "setup": steps}
    ok = True
    try:
        conn = setup(steps)
        with open(SNAPSHOT) as f:
            result["snapshot"] = json.load(f)
        result["libvirt"] = conn.getLibVersion()
        result["domains"] = {}
        for version, q in qemus().items():
            rec = run_domain(conn, version, q)
            result["domains"][version] = rec
            print(json.dumps({k: rec.get(k) for k in ("domain", "final_state", "error")}))
            ok = ok and "error" not in rec
    except (RuntimeError, OSError, libvirt.libvirtError) as e:
        result["error"] = str(e)
        ok = False
    if os.path.exists(AUDIT):
        with open(AUDIT) as f:
            result["audit"] = f.read().splitlines()[-50:]
    for log in ("/var/log/libvirt/libvirtd.log",):
        if os.path.exists(log):
            with open(log, errors="replace") as f:
                result["libvirtd_log"] = f.read()[-4000:]
    with open(os.path.join(outdir, "libvirt.json"), "w") as f:
        json.dump(result, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
