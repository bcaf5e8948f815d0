"""Stock-QEMU guests for the stream backend's tests: a real libvirtd, a real QEMU 7.2 (TCG),
and no firmware-register QMP interface anywhere (no ``<hvc:qmp>``, no simulator).

What these tests can and cannot prove on this machine: a TCG guest's migration stream has no
firmware registers (coproc 0x14/0x16 are KVM's), so ``hvcpolicy start`` reads an empty firmware
view from every vCPU. The cycle's mechanics are real all the same: the save, the image in the
root-only directory, the paused restore with ``<hvc:applied backend="stream">``, the read-back
by a memory-only snapshot, the resume, every fault. Where a test must see a value go through
the cycle, it drives :class:`hvcpolicy.savecycle.StreamFirmware` with ``any_register`` on an
ordinary system register of the TCG list (TPIDR_EL0); the lab runs the same cycle on real KVM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from tests.libvirt.conftest import NS, SYSTEM_QMP_DIR, SYSTEM_URI, Lab, run, virsh, wait_for

# TPIDR_EL0 (op0 3, op1 3, CRn 13, CRm 0, op2 2): a plain read-write register in every TCG
# vCPU's cpreg list; its AArch32 alias TPIDRURW follows it in QEMU's state.
TPIDR_EL0 = 0x603000000013DE82
TPIDRURW = 0x40200000200F6802
# REVIDR_EL1: constant under TCG; a list carrying another value fails QEMU's load
REVIDR_EL1 = 0x603000000013C006

POLICIES: dict[str, dict[str, object]] = {
    # denies a feature the host snapshot offers: start predicts a write, so it saves first
    "noptp": {"features": {"ptp": "deny"}, "unknown": "allow"},
}


def stock_xml(
    name: str,
    policy: str | None,
    vcpus: int = 2,
    memory_mib: int = 128,
    qmp: bool = False,
    resume: bool = False,
) -> str:
    """``qmp``: a second QMP socket for hvcpolicy, as ``hvcpolicy attach`` adds: QEMU's own
    QMP (runstate, no firmware registers)."""
    cmdline = (
        "<qemu:commandline><qemu:arg value='-qmp'/><qemu:arg "
        f"value='unix:{SYSTEM_QMP_DIR}/{name}.qmp,server=on,wait=off'/></qemu:commandline>"
        if qmp
        else ""
    )
    inner = '<hvc:resume after="apply"/>' if resume else ""
    meta = (
        f'<metadata><hvc:policy xmlns:hvc="{NS}" ref="{policy}">{inner}</hvc:policy></metadata>'
        if policy is not None
        else ""
    )
    return f"""<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  {meta}
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>{vcpus}</vcpu>
  <os><type arch='aarch64' machine='virt'>hvm</type></os>
  <cpu mode='custom' match='exact'><model fallback='forbid'>cortex-a57</model></cpu>
  <devices><console type='pty'/></devices>
  {cmdline}
</domain>
"""


def define_stock(lab: Lab, policy: str | None, **kw: Any) -> str:
    for name, spec in POLICIES.items():
        if not (lab.policies / f"{name}.json").exists():
            lab.write_policy(name, spec)
    name = f"hvct-{uuid.uuid4().hex[:8]}"
    path = lab.root / f"{name}.xml"
    path.write_text(stock_xml(name, policy, **kw))
    virsh(SYSTEM_URI, "define", str(path))
    return name


def state(name: str) -> str:
    return str(virsh(SYSTEM_URI, "domstate", name, timeout=30).stdout.strip())


def live_xml(name: str) -> str:
    return str(virsh(SYSTEM_URI, "dumpxml", name, timeout=30).stdout)


def start_cmd(name: str, save_dir: Path) -> list[str]:
    return [sys.executable, "-m", "hvcpolicy", "start", name, "--save-dir", str(save_dir)]


def env(lab: Lab, fault: str | None = None) -> dict[str, str]:
    out = lab.env()
    if fault is not None:
        out["HVCPOLICY_TEST_FAULT"] = fault
    return out


def hvc_start(lab: Lab, name: str, save_dir: Path, fault: str | None = None) -> Any:
    """``hvcpolicy start NAME`` to the end (a ``STEP:kill`` fault ends it there)."""
    return run(
        start_cmd(name, save_dir),
        timeout=180,
        check=False,
        env=env(lab, fault),
        cwd="/",
    )


def stopped_at(lab: Lab, name: str, save_dir: Path, step: str) -> subprocess.Popen[str]:
    """``hvcpolicy start NAME`` stopped (SIGSTOP) at ``step``: the caller acts, then
    :func:`carry_on`."""
    proc = subprocess.Popen(
        start_cmd(name, save_dir),
        env=env(lab, f"{step}:stop"),
        cwd="/",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def stopped() -> bool:
        if proc.poll() is not None:
            raise AssertionError(
                f"start ended (rc {proc.returncode}) before {step}: "
                f"{proc.stderr.read() if proc.stderr else ''}"
            )
        try:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return False
        return fields[0] == "T"

    wait_for(stopped, 120, f"hvcpolicy start stopped at {step}")
    return proc


def carry_on(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    os.kill(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=180)
    return proc.returncode, out, err


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got: {stderr!r}"
    assert "Traceback" not in stderr
    return lines[0]


def cleanup(name: str) -> None:
    virsh(SYSTEM_URI, "destroy", name, check=False, timeout=30)
    virsh(SYSTEM_URI, "undefine", name, check=False, timeout=30)


def wait_state(name: str, want: str, timeout: float = 30) -> None:
    wait_for(lambda: state(name) == want, timeout, f"{name} {want}")


def images(save_dir: Path) -> list[str]:
    return sorted(p.name for p in save_dir.iterdir()) if save_dir.exists() else []
