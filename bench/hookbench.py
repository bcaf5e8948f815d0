"""The libvirt hook, run exactly as libvirtd runs it, against same-run baselines.

The hook is installed by ``hvcpolicy install-hook`` into ``bench/out/hook/`` and run as libvirtd
runs it: argv ``DOMAIN STAGE SUBOP -``, the domain XML on stdin, an environment of only PATH,
HOME and LC_ALL, cwd ``/``. Its config is the system one, ``/etc/hvcpolicy/hook.conf``: this
part runs in a private mount namespace (``unshare -m``) where /etc is an overlay whose writes
land in ``bench/out/hook/etc``, so the machine's own config is never touched and nobody else sees
ours.

The ``started`` stage talks over QMP to ``hvcpolicy simulate`` with 1, 8 and 64 vCPUs, reset to
a fresh guest's registers (off the clock) before every run, so every run plans, writes, reads
back every vCPU and verifies. Its detached recorder runs a ``virsh`` stub (``bench/out/hook/bin``).
``reconnect`` reads and verifies a guest started under the policy.

The hook runs the package as a Debian install lays it out: ``hvcpolicy`` and ``qemu.qmp`` side by
side in one directory (``bench/out/hook/pkg``, the hook's ``HVC_PKGDIR``), byte-compiled by the
hook's Python. The QMP stages are measured against that Python importing only ``qemu.qmp`` from
there: what any QMP client in Python pays before its first byte.

Usage (run.py does this): ``python3 bench/hookbench.py --reps N --json OUT``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    OUT,
    REPO,
    Case,
    Figure,
    check_once,
    interleave,
    median,
    peak_rss_kib,
    write_figures,
)

HOOK_PYTHON = "/usr/bin/python3"  # what install-hook names for a Debian host, as the tests do
NS = "https://hvcpolicy.dev/xmlns/libvirt/1"
HOST_FIXTURE = REPO / "examples" / "hosts" / "neoverse-n1_linux-6.18.json"
SIM_KERNEL = "6.18"
VCPUS = (1, 8, 64)
IN_NS = "HVC_BENCH_IN_NAMESPACE"


def reexec_in_namespace() -> None:
    """Run this script again in a private mount namespace with our /etc/hvcpolicy."""
    if os.environ.get(IN_NS) == "1":
        return
    if os.geteuid() != 0:
        raise SystemExit("bench: the hook part runs as root (it binds its config over /etc)")
    unshare = shutil.which("unshare")
    if unshare is None:
        raise SystemExit("bench: needs unshare(1) (util-linux)")
    env = {**os.environ, IN_NS: "1"}
    cmd = [unshare, "--mount", "--propagation", "private", sys.executable, *sys.argv]
    os.execve(unshare, cmd, env)


def private_etc(scratch: Path) -> None:
    """In our mount namespace only: /etc as an overlay whose writes land in ``scratch``, so that
    install-hook writes /etc/hvcpolicy/hook.conf where only this run sees it."""
    upper, work = scratch / "upper", scratch / "work"
    upper.mkdir(parents=True)
    work.mkdir()
    opts = f"lowerdir=/etc,upperdir={upper},workdir={work}"
    mount = ["mount", "-t", "overlay", "overlay", "-o", opts, "/etc"]
    subprocess.run(mount, check=True, timeout=30)
    os.makedirs("/etc/hvcpolicy", exist_ok=True)
    # this machine's own hook config (a test run's, say) is not ours to build on: install-hook
    # writes a fresh one (removed in the overlay only; the machine's stays as it is)
    with contextlib.suppress(FileNotFoundError):
        os.unlink("/etc/hvcpolicy/hook.conf")


# --- domain XML as libvirt hands it to the hook -------------------------------------------------


def live_xml(name: str, uuid: str, meta: str) -> str:
    """A libvirt live XML of realistic size (~5 KiB): metadata first, then the usual devices."""
    metadata = f"  <metadata>\n{meta}  </metadata>\n" if meta else ""
    disks = "".join(
        f"""    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none' io='native'/>
      <source file='/var/lib/libvirt/images/{name}-{i}.qcow2' index='{i + 1}'/>
      <backingStore/>
      <target dev='vd{chr(97 + i)}' bus='virtio'/>
      <alias name='virtio-disk{i}'/>
      <address type='pci' domain='0x0000' bus='0x0{i + 4}' slot='0x00' function='0x0'/>
    </disk>
"""
        for i in range(3)
    )
    nics = "".join(
        f"""    <interface type='bridge'>
      <mac address='52:54:00:12:34:{i:02x}'/>
      <source bridge='br{i}'/>
      <target dev='vnet{i}'/>
      <model type='virtio'/>
      <alias name='net{i}'/>
      <address type='pci' domain='0x0000' bus='0x0{i + 1}' slot='0x00' function='0x0'/>
    </interface>
"""
        for i in range(2)
    )
    return f"""<domain type='kvm' id='7' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
{metadata}  <memory unit='KiB'>4194304</memory>
  <currentMemory unit='KiB'>4194304</currentMemory>
  <vcpu placement='static'>4</vcpu>
  <resource>
    <partition>/machine</partition>
  </resource>
  <os>
    <type arch='aarch64' machine='virt-7.2'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/AAVMF/AAVMF_CODE.fd</loader>
    <nvram>/var/lib/libvirt/qemu/nvram/{name}_VARS.fd</nvram>
    <boot dev='hd'/>
  </os>
  <features>
    <acpi/>
    <gic version='3'/>
  </features>
  <cpu mode='host-passthrough' check='none'/>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-aarch64</emulator>
{disks}{nics}    <serial type='pty'>
      <source path='/dev/pts/3'/>
      <target type='system-serial' port='0'>
        <model name='pl011'/>
      </target>
      <alias name='serial0'/>
    </serial>
    <console type='pty' tty='/dev/pts/3'>
      <source path='/dev/pts/3'/>
      <target type='serial' port='0'/>
      <alias name='serial0'/>
    </console>
    <channel type='unix'>
      <source mode='bind' path='/run/libvirt/qemu/channel/7-{name}/org.qemu.guest_agent.0'/>
      <target type='virtio' name='org.qemu.guest_agent.0' state='disconnected'/>
      <alias name='channel0'/>
      <address type='virtio-serial' controller='0' bus='0' port='1'/>
    </channel>
    <memballoon model='virtio'>
      <alias name='balloon0'/>
    </memballoon>
    <rng model='virtio'>
      <backend model='random'>/dev/urandom</backend>
      <alias name='rng0'/>
    </rng>
  </devices>
  <seclabel type='dynamic' model='apparmor' relabel='yes'>
    <label>libvirt-{uuid}</label>
    <imagelabel>libvirt-{uuid}</imagelabel>
  </seclabel>
  <qemu:commandline>
    <qemu:arg value='-qmp'/>
    <qemu:arg value='unix:/var/lib/libvirt/qemu/hvcpolicy/{name}.qmp,server=on,wait=off'/>
  </qemu:commandline>
</domain>
"""


def policy_meta(ref: str, socket_path: str, applied: str = "") -> str:
    return (
        f'    <hvc:policy xmlns:hvc="{NS}" ref="{ref}">\n'
        '      <hvc:feature name="ptp" mode="deny"/>\n'
        f'      <hvc:qmp socket="{socket_path}"/>\n'
        f"{applied}"
        "    </hvc:policy>\n"
    )


def applied_block(registers: dict[str, str]) -> str:
    regs = "".join(
        f'        <hvc:register id="{rid}" value="{v}"/>\n' for rid, v in sorted(registers.items())
    )
    return (
        '      <hvc:applied host="node-17" kernel="6.18.30-61.116.amzn2023.aarch64" '
        f'at="2026-11-24T23:00:00Z">\n{regs}      </hvc:applied>\n'
    )


# --- a small QMP client to serve the simulators (off the clock) ---------------------------------


class QMP:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.buf = b""
        self._recv()
        self.cmd("qmp_capabilities")

    def _recv(self) -> dict[str, object]:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("QMP closed")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        doc: dict[str, object] = json.loads(line)
        return doc

    def cmd(self, name: str, **arguments: object) -> object:
        msg: dict[str, object] = {"execute": name}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode())
        while True:
            reply = self._recv()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise RuntimeError(f"QMP {name}: {reply['error']}")

    def close(self) -> None:
        self.sock.close()


class Sim:
    """``hvcpolicy simulate`` with N vCPUs; ``reset()`` puts back a fresh guest's registers."""

    def __init__(self, path: Path, vcpus: int) -> None:
        self.path = str(path)
        self.vcpus = vcpus
        path.unlink(missing_ok=True)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hvcpolicy", "simulate", "--socket", self.path,
             "--kernel", SIM_KERNEL, "--vcpus", str(vcpus)],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, cwd="/",
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while not os.path.exists(self.path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"bench: hvcpolicy simulate ({vcpus} vCPUs) did not come up")
            time.sleep(0.02)
        q = QMP(self.path)
        try:
            cpus = q.cmd("query-cpus-fast")
            assert isinstance(cpus, list) and len(cpus) == vcpus
            self.first = str(cpus[0]["qom-path"])
            fresh = q.cmd("qom-get", path=self.first, property="kvm-firmware-registers")
            assert isinstance(fresh, dict)
            self.fresh = fresh
        finally:
            q.close()

    def read(self) -> dict[str, int]:
        q = QMP(self.path)
        try:
            regs = q.cmd("qom-get", path=self.first, property="kvm-firmware-registers")
            assert isinstance(regs, dict)
            return regs
        finally:
            q.close()

    def reset(self) -> None:
        q = QMP(self.path)
        try:
            q.cmd("qom-set", path=self.first, property="kvm-firmware-registers", value=self.fresh)
        finally:
            q.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


# --- the run ------------------------------------------------------------------------------------


def stage_package(package: Path, dest: Path) -> None:
    """``hvcpolicy`` from ``package`` and ``qemu.qmp`` (as this Python has it installed) side by
    side in ``dest``, byte-compiled by the hook's Python: what the .deb installs."""
    import qemu.qmp

    qemu_dir = Path(qemu.qmp.__file__).resolve().parent.parent
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(package / "hvcpolicy", dest / "hvcpolicy", ignore=ignore)
    shutil.copytree(qemu_dir, dest / "qemu", ignore=ignore)
    shutil.copytree(package / "hooks", dest / "hooks")  # the hook script install-hook renders
    subprocess.run([HOOK_PYTHON, "-m", "compileall", "-q", str(dest)], check=True, timeout=300)


def setup(work: Path, package: Path) -> tuple[str, dict[str, str]]:
    """Install the hook as an operator would; -> (the hook's path, libvirtd's environment)."""
    if work.exists():
        shutil.rmtree(work)
    for d in ("policies", "home", "bin", "hooks", "xml", "sim"):
        (work / d).mkdir(parents=True)
    stage_package(package, work / "pkg")
    private_etc(work / "etc")
    shutil.copy(REPO / "examples" / "policies" / "fleet-2026.yaml", work / "policies")
    shutil.copy(HOST_FIXTURE, work / "host.json")
    stub = work / "bin" / "virsh"  # the recorder's virsh: no libvirtd in this part
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    done = subprocess.run(
        [sys.executable, "-m", "hvcpolicy", "install-hook", "--no-reload",
         "--hooks-dir", str(work / "hooks"), "--python", HOOK_PYTHON,
         "--policy-dir", str(work / "policies"), "--host-snapshot", str(work / "host.json"),
         "--cache-dir", str(work / "cache")],
        env={**os.environ, "PYTHONPATH": str(work / "pkg")}, capture_output=True, text=True,
        timeout=60, cwd="/", check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"bench: install-hook failed: {done.stderr}")
    env = {"PATH": f"{work / 'bin'}:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(work / "home")}
    env["LC_ALL"] = "C"
    return str(work / "hooks" / "qemu.d" / "hvcpolicy"), env


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--json", type=Path, default=OUT / "hook.json")
    ap.add_argument(
        "--package",
        type=Path,
        default=REPO,
        help="the tree whose hvcpolicy the hook runs (to measure a candidate change)",
    )
    args = ap.parse_args()
    args.json = args.json.resolve()
    reexec_in_namespace()
    os.chdir("/")  # libvirt runs hooks with cwd /
    work = OUT / "hook"
    hook, env = setup(work, args.package.resolve())
    xml = work / "xml"

    def put(name: str, text: str) -> str:
        path = xml / name
        path.write_text(text)
        return str(path)

    sims = {n: Sim(work / "sim" / f"vm{n}.sock", n) for n in VCPUS}
    try:
        return run(args, hook, env, put, sims)
    finally:
        for s in sims.values():
            s.stop()


def run(args: argparse.Namespace, hook: str, env: dict[str, str], put, sims: dict[int, Sim]) -> int:  # type: ignore[no-untyped-def]
    uuid = "6c1b7a1e-3f0c-4c52-9a51-1f6b0e1e0001"
    plain = put("plain.xml", live_xml("plain", uuid, ""))
    web = put("web1.xml", live_xml("web1", uuid, policy_meta("fleet-2026", "/nonexistent.qmp")))
    sim_fresh = {k: v for k, v in sims[1].fresh.items()}
    # what a guest started under this policy on a 6.18 host carries: the simulator's answer
    sims[1].reset()
    cases: list[Case] = []
    sh = Case("sh -c 'cat >/dev/null'", ["/bin/sh", "-c", "cat >/dev/null"], web, env)
    py = Case("python3 -I -S -c pass", [HOOK_PYTHON, "-I", "-S", "-c", "pass"], None, env)
    only_qmp = f"import sys; sys.path.insert(0, {str(OUT / 'hook' / 'pkg')!r}); import qemu.qmp"
    py_qmp = Case(
        "python3 -I -S -c 'import qemu.qmp'", [HOOK_PYTHON, "-I", "-S", "-c", only_qmp], None, env
    )
    ign_stage = Case("hook: ignored stage (start)", [hook, "web1", "start", "begin", "-"], web, env)
    ign_dom = Case(
        "hook: ignored domain (prepare, no hvcpolicy metadata)",
        [hook, "plain", "prepare", "begin", "-"], plain, env,
    )  # fmt: skip
    prepare = Case("hook: prepare", [hook, "web1", "prepare", "begin", "-"], web, env)
    started: dict[int, Case] = {}
    for n, sim in sims.items():
        path = put(f"vm{n}.xml", live_xml("web1", uuid, policy_meta("fleet-2026", sim.path)))
        started[n] = Case(
            f"hook: started/prelaunch apply, {n} vCPU(s)",
            [hook, "web1", "started", "begin", "-"], path, env, before=sim.reset,
        )  # fmt: skip
    # the <hvc:applied> a start under this policy leaves: apply once, read it back
    check_once(started[1])
    applied = {k: f"0x{int(v):x}" for k, v in sims[1].read().items()}
    assert applied != {k: f"0x{int(v):x}" for k, v in sim_fresh.items()}, "the apply wrote nothing"
    meta = policy_meta("fleet-2026", "/nonexistent.qmp", applied_block(applied))
    moving = put("web1-applied.xml", live_xml("web1", uuid, meta))
    # the apply command, as an operator runs it (the Python with site-packages: qemu.qmp)
    cli_env = {**env, "PYTHONPATH": str(REPO)}
    policy_file = str(OUT / "hook" / "policies" / "fleet-2026.yaml")
    applies = [
        Case(
            f"hvcpolicy apply (CLI), {n} vCPU(s)",
            [
                sys.executable,
                "-m",
                "hvcpolicy",
                "apply",
                "--qmp",
                sim.path,
                "--policy",
                policy_file,
            ],
            None,
            cli_env,
            before=sim.reset,
        )
        for n, sim in sims.items()
    ]
    migrate = Case("hook: migrate", [hook, "web1", "migrate", "begin", "-"], moving, env)
    restore = Case("hook: restore", [hook, "web1", "restore", "begin", "-"], moving, env)
    # reconnect: the guest the apply above left, with its record
    recorded = put(
        "vm1-applied.xml",
        live_xml("web1", uuid, policy_meta("fleet-2026", sims[1].path, applied_block(applied))),
    )
    reconnect = Case(
        "hook: reconnect verify, 1 vCPU", [hook, "web1", "reconnect", "begin", "-"], recorded, env
    )
    cases = [sh, py, py_qmp, ign_stage, ign_dom, prepare, migrate, restore, *started.values(),
             reconnect, *applies]  # fmt: skip
    for case in cases:  # each must do what it claims before it is timed
        check_once(case)
    audit_ok = check_once(prepare) == ""
    if not audit_ok:
        raise SystemExit("bench: the prepare hook wrote to stderr")
    interleave(cases, args.reps)
    ms = 1000.0
    figs = [
        Figure(ign_stage.name, median(ign_stage.times) * ms, "ms", sh.name,
               median(sh.times) * ms, 2.0, "<= 2x"),
        Figure(ign_dom.name, median(ign_dom.times) * ms, "ms", sh.name,
               median(sh.times) * ms, 2.0, "<= 2x"),
    ]  # fmt: skip
    for case in (prepare, migrate, restore):
        figs.append(
            Figure(case.name, median(case.times) * ms, "ms", py.name, median(py.times) * ms,
                   3.0, "<= 3x")
        )  # fmt: skip
    for case in (*started.values(), reconnect):  # the QMP stages (issue 14: <= 1.5x)
        figs.append(
            Figure(case.name, median(case.times) * ms, "ms", py_qmp.name,
                   median(py_qmp.times) * ms, 1.5, "<= 1.5x")
        )  # fmt: skip
    for case in applies:
        figs.append(
            Figure(case.name, median(case.times) * ms, "ms", py.name, median(py.times) * ms,
                   4.0, "<= 4x", informational=True)
        )  # fmt: skip
    rss = {c.name: peak_rss_kib(c) for c in cases if c not in (sh, py_qmp) and c not in applies}
    worst = max((n for n in rss if n.startswith("hook")), key=lambda n: rss[n])
    figs.append(
        Figure(f"hook peak RSS (highest: {worst.removeprefix('hook: ')})", rss[worst] / 1024,
               "MiB", f"{py.name} peak RSS", rss[py.name] / 1024, 40.0, "< 40 MiB",
               absolute=True)
    )  # fmt: skip
    extra = {"reps": args.reps, "timings": {c.name: c.times for c in cases}, "rss_kib": rss}
    write_figures(args.json, figs, extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
