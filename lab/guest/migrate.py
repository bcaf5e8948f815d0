#!/usr/bin/env python3
"""Inside the lab: real QEMU-on-KVM migrations between lab kernels, through a state file.

    python3 lab/guest/migrate.py save OUTDIR          # this kernel as the source
    python3 lab/guest/migrate.py load OUTROOT OUTDIR  # this kernel as the destination of each

``save`` starts, with each QEMU of the rootfs, a KVM guest with ``-S`` (it never runs, so its
firmware registers are this kernel's defaults), and migrates it to ``OUTDIR/state-<qemu>.bin``.
``load`` starts the same QEMU with ``-incoming defer`` and ``migrate-incoming`` of every
``OUTROOT/<kernel>/state-<qemu>.bin``, and records whether QEMU accepted it (the load completed and
the destination QEMU is alive and paused) or what it said. Results: ``OUTDIR/save.json``,
``OUTDIR/load.json``.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
from typing import Any

TIMEOUT = 90.0
# Two vCPUs, so every stream carries two copies of the per-VM firmware registers and an edit of
# only the first is seen to be undone by the second (the last vCPU loaded wins).
VCPUS = 2

# The checkout is on 9p at /mnt/host (run.py puts it on PYTHONPATH); by hand, find it from here.
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from hvcpolicy.errors import HvcError  # noqa: E402
from hvcpolicy.stream import apply, parse_stream, replace_lists  # noqa: E402


def qemus() -> dict[str, dict[str, Any]]:
    """{version: {"exe": path, "env": extra environment, "args": extra args}} of every QEMU."""
    found: dict[str, dict[str, Any]] = {}
    cands = [("/usr/bin/qemu-system-aarch64", None)]
    for exe in sorted(glob.glob("/opt/qemu-*/usr/bin/qemu-system-aarch64")):
        cands.append((exe, exe[: -len("/usr/bin/qemu-system-aarch64")]))
    for exe, root in cands:
        if not os.path.exists(exe):
            continue
        env = dict(os.environ)
        args: list[str] = []
        if root is not None:
            args = ["-L", f"{root}/usr/share/qemu"]
            mods = glob.glob(f"{root}/usr/lib/*/qemu")
            if mods:
                env["QEMU_MODULE_DIR"] = mods[0]
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, env=env).stdout
        m = re.search(r"version (\d+\.\d+\.\d+)", out)
        if m:
            found[m.group(1)] = {"exe": exe, "env": env, "args": args}
    return found


class QMP:
    def __init__(self, path: str, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + TIMEOUT
        while True:
            if proc.poll() is not None:
                raise RuntimeError("QEMU exited before its QMP socket came up")
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.sock.settimeout(TIMEOUT)
        self.buf = b""
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise RuntimeError("QMP connection closed")
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def cmd(self, name: str, **arguments: Any) -> Any:
        req: dict[str, Any] = {"execute": name}
        if arguments:
            req["arguments"] = arguments
        self.sock.sendall(json.dumps(req).encode() + b"\n")
        while True:
            msg = self._read()
            if "return" in msg:
                return msg["return"]
            if "error" in msg:
                raise RuntimeError(f"{name}: {msg['error'].get('desc')}")

    def close(self) -> None:
        self.sock.close()


def start(q: dict[str, Any], sock: str, extra: list[str]) -> subprocess.Popen[bytes]:
    if os.path.exists(sock):
        os.unlink(sock)
    cmd = [
        q["exe"],
        *q["args"],
        "-machine",
        "virt,gic-version=3",
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-m",
        "64",
        "-smp",
        str(VCPUS),
        "-nodefaults",
        "-display",
        "none",
        "-S",
        "-qmp",
        f"unix:{sock},server=on,wait=off",
        *extra,
    ]
    return subprocess.Popen(
        cmd,
        env=q["env"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )


def finish(proc: subprocess.Popen[bytes]) -> str:
    try:
        _, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err.decode(errors="replace").strip()


def wait_migration(qmp: QMP, proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return {"status": "exited"}
        info: dict[str, Any] = qmp.cmd("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            return info
        time.sleep(0.2)
    return {"status": "timeout"}


PSCI_VERSION = 0x6030000000140000
VENDOR_HYP_BMAP_2 = 0x6030000000160003
PSCI_1_1 = 0x10001


def stream_firmware(data: bytes) -> dict[int, int]:
    """The firmware registers (coproc 0x14/0x16) the stream carries, with their values: the ones
    every vCPU agrees on (hvcpolicy.stream refuses a stream whose vCPUs disagree)."""
    return parse_stream(data, "stream").firmware()


def vcpu_firmware(data: bytes) -> list[dict[int, int]]:
    """Every vCPU's firmware registers, in the order QEMU loads them."""
    return [c.firmware for c in parse_stream(data, "stream").vcpus]


def patched(data: bytes, changes: dict[int, int]) -> bytes:
    """The stream with some cpreg values changed in EVERY vCPU's list (the last vCPU loaded
    decides what KVM keeps): the guest as hvcpolicy would have left it."""
    return apply(data, parse_stream(data, "stream").edits(changes))


def is_fw(rid: int) -> bool:
    return (rid >> 16) & 0xFFFF in (0x14, 0x16)


def transplant(dst_data: bytes, src_data: bytes) -> bytes:
    """The destination's own stream with the source's firmware registers in place of its own,
    in every vCPU's list.

    Everything else (system, demux and timer registers, memory, devices) is what the destination
    kernel itself produced, so loading it asks QEMU and the destination kernel about the firmware
    registers alone: the question hvcpolicy answers. The lists may grow or shrink (a register
    only one side has); the counts and the stream's vmdesc are rewritten to match.
    """
    dst = parse_stream(dst_data, "destination stream")
    src_fw = parse_stream(src_data, "source stream").firmware()
    lists = [
        {**{i: v for i, v in c.registers.items() if not is_fw(i)}, **src_fw} for c in dst.vcpus
    ]
    return replace_lists(dst_data, lists, "destination stream")


def variants(fw: dict[int, int]) -> dict[str, dict[int, int]]:
    """Guest states worth migrating besides the kernel's defaults (only where they differ):
    PSCI pinned to 1.1 (a policy's psci.version), and VENDOR_HYP_BMAP_2 with both bits set."""
    res: dict[str, dict[int, int]] = {}
    if fw.get(PSCI_VERSION, 0) > PSCI_1_1:
        res["psci-1.1"] = {PSCI_VERSION: PSCI_1_1}
    if VENDOR_HYP_BMAP_2 in fw:
        res["psci-1.1-bmap2-3"] = {PSCI_VERSION: min(fw[PSCI_VERSION], PSCI_1_1)}
        res["psci-1.1-bmap2-3"][VENDOR_HYP_BMAP_2] = 0x3
    return res


def save(outdir: str) -> int:
    results = []
    for version, q in qemus().items():
        sock = f"/tmp/src-{version}.qmp"
        state = os.path.abspath(os.path.join(outdir, f"state-{version}.bin"))
        if os.path.exists(state):
            os.unlink(state)
        t = time.monotonic()
        proc = start(q, sock, [])
        rec: dict[str, Any] = {"qemu": version, "state": os.path.basename(state)}
        try:
            qmp = QMP(sock, proc)
            rec["runstate"] = qmp.cmd("query-status")["status"]
            qmp.cmd("migrate", uri=f"file:{state}")
            info = wait_migration(qmp, proc)
            rec["status"] = info.get("status")
            rec["error"] = info.get("error-desc")
            qmp.cmd("quit")
            qmp.close()
        except (RuntimeError, OSError) as e:
            rec["status"] = "error"
            rec["error"] = str(e)
        rec["stderr"] = finish(proc)
        rec["seconds"] = round(time.monotonic() - t, 2)
        rec["variant"] = "default"
        print(json.dumps(rec), flush=True)
        results.append(rec)
        if rec["status"] != "completed":
            continue
        with open(state, "rb") as f:
            data = f.read()
        try:
            fw = stream_firmware(data)
            rec["vcpus"] = len(vcpu_firmware(data))
        except HvcError as e:
            rec["status"] = "unreadable"
            rec["error"] = str(e)
            continue
        rec["registers"] = {f"0x{r:016x}": f"0x{v:x}" for r, v in fw.items()}
        for name, changes in variants(fw).items():
            vstate = os.path.join(outdir, f"state-{version}-{name}.bin")
            vdata = patched(data, changes)
            with open(vstate, "wb") as f:
                f.write(vdata)
            per_vcpu = vcpu_firmware(vdata)
            results.append(
                {
                    **{k: rec[k] for k in ("qemu", "runstate", "status", "vcpus")},
                    "variant": name,
                    "state": os.path.basename(vstate),
                    "registers": {f"0x{r:016x}": f"0x{v:x}" for r, v in per_vcpu[0].items()},
                    "vcpu_registers": [
                        {f"0x{r:016x}": f"0x{v:x}" for r, v in fw.items()} for fw in per_vcpu
                    ],
                }
            )
    with open(os.path.join(outdir, "save.json"), "w") as f:
        json.dump({"kernel": platform.release(), "saves": results}, f, indent=1)
    return 0 if all(r["status"] == "completed" for r in results) else 1


def load(outroot: str, outdir: str) -> int:
    results = []
    sources = []
    for path in sorted(glob.glob(os.path.join(outroot, "*", "save.json"))):
        with open(path) as f:
            for rec in json.load(f)["saves"]:
                if rec["status"] == "completed":
                    src = os.path.basename(os.path.dirname(path))
                    state = os.path.join(os.path.dirname(path), rec["state"])
                    sources.append((rec["qemu"], src, rec["variant"], state))
    jobs = []
    for version in qemus():
        own = os.path.join(outdir, f"state-{version}.bin")
        for qemu, source, variant, state in sources:
            if qemu != version:
                continue
            jobs.append((version, source, variant, "full", state))
            if os.path.exists(own):
                with open(own, "rb") as f, open(state, "rb") as g:
                    try:
                        mixed = transplant(f.read(), g.read())
                    except HvcError as e:
                        print(json.dumps({"transplant": state, "error": str(e)}), flush=True)
                        continue
                path = f"/tmp/fw-{version}-{source}-{variant}.bin"
                with open(path, "wb") as f:
                    f.write(mixed)
                jobs.append((version, source, variant, "firmware", path))
    all_qemus = qemus()
    for version, source, variant, kind, state in jobs:
        q = all_qemus[version]
        sock = f"/tmp/dst-{version}.qmp"
        t = time.monotonic()
        # QEMU 11.1 names, as trace events, the registers it tolerates on either side.
        newer = tuple(int(x) for x in version.split(".")[:2]) >= (11, 1)
        trace = ["-trace", "tolerate_cpreg_*"] if newer else []
        proc = start(q, sock, ["-incoming", "defer", *trace])
        rec: dict[str, Any] = {
            "qemu": version,
            "source": source,
            "variant": variant,
            "stream": kind,
        }
        try:
            qmp = QMP(sock, proc)
            qmp.cmd("migrate-incoming", uri=f"file:{os.path.abspath(state)}")
            info = wait_migration(qmp, proc)
            rec["status"] = info.get("status")
            rec["error"] = info.get("error-desc")
            if rec["status"] == "completed":
                time.sleep(0.5)  # the registers are put after the load: let that fail, if so
                rec["runstate"] = qmp.cmd("query-status")["status"]
                qmp.cmd("quit")
            qmp.close()
        except (RuntimeError, OSError) as e:
            rec.setdefault("status", "error")
            rec["error"] = str(e)
        rec["alive"] = proc.poll() is None or proc.returncode == 0
        rec["stderr"] = finish(proc)
        rec["exit"] = proc.returncode
        rec["accepted"] = (
            rec.get("status") == "completed"
            and rec.get("runstate") in ("prelaunch", "paused")
            and proc.returncode == 0
        )
        rec["seconds"] = round(time.monotonic() - t, 2)
        print(json.dumps(rec), flush=True)
        results.append(rec)
    with open(os.path.join(outdir, "load.json"), "w") as f:
        json.dump({"kernel": platform.release(), "loads": results}, f, indent=1)
    return 0


def main() -> int:
    if sys.argv[1:2] == ["save"]:
        return save(sys.argv[2])
    if sys.argv[1:2] == ["load"]:
        return load(sys.argv[2], sys.argv[3])
    sys.stderr.write(__doc__ or "")
    return 2


if __name__ == "__main__":
    sys.exit(main())
