"""`hvcpolicy host probe`: on this machine, and inside the lab on each real arm64 KVM kernel."""

from __future__ import annotations

import errno
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hvcpolicy import kvm
from hvcpolicy.errors import KVMUnavailable
from hvcpolicy.snapshot import load_snapshot
from tests.lab.labdata import CASE_IDS, CASES, LABELS, REPO, LabKernel, fixture_path


def hvcpolicy(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hvcpolicy", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        check=False,
    )


@pytest.mark.skipif(platform.machine() == "aarch64", reason="this host is arm64: the lab covers it")
def test_probe_without_arm64_kvm_exits_5(tmp_path: Path) -> None:
    out = tmp_path / "host.json"
    cp = hvcpolicy("host", "probe", "-o", str(out))
    assert cp.returncode == 5, cp.stderr
    assert "no arm64 KVM on this host" in cp.stderr
    assert platform.machine() in cp.stderr
    assert cp.stderr.count("\n") == 1 and "Traceback" not in cp.stderr
    assert not out.exists()
    # The default path comes from $HVCPOLICY_HOST_SNAPSHOT; still nothing is written.
    env_out = tmp_path / "env.json"
    cp = hvcpolicy("host", "probe", env={"HVCPOLICY_HOST_SNAPSHOT": str(env_out)})
    assert cp.returncode == 5 and not env_out.exists()


def test_probe_without_dev_kvm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kvm.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(kvm, "DEV_KVM", "/nonexistent/kvm")
    with pytest.raises(KVMUnavailable, match="/nonexistent/kvm does not exist"):
        kvm.probe()


def test_scratch_vm_closes_every_fd_even_on_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake /dev/kvm whose vCPU init fails: every fd the probe opened is closed."""
    opened: list[int] = []
    real_open = os.open

    def fake_open(path: str, flags: int, *a: Any) -> int:
        fd = real_open(os.devnull, os.O_RDWR)
        opened.append(fd)
        return fd

    def fake_ioctl(fd: int, request: int, arg: Any, what: str) -> int:
        if request in (kvm.KVM_CREATE_VM, kvm.KVM_CREATE_VCPU):
            fd = real_open(os.devnull, os.O_RDWR)
            opened.append(fd)
            return fd
        if request == kvm.KVM_ARM_PREFERRED_TARGET:
            return 0
        raise kvm.KVMError(errno.EINVAL, what)

    monkeypatch.setattr(kvm.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(kvm.os.path, "exists", lambda p: True)
    monkeypatch.setattr(kvm.os, "open", fake_open)
    monkeypatch.setattr(kvm, "_ioctl", fake_ioctl)
    with pytest.raises(KVMUnavailable, match="KVM_ARM_VCPU_INIT"):
        kvm.probe()
    assert len(opened) == 3  # /dev/kvm, the VM, the vCPU
    for fd in opened:
        with pytest.raises(OSError):
            os.fstat(fd)


@pytest.mark.parametrize(("label", "cpu"), CASES, ids=CASE_IDS)
def test_probe_in_lab_writes_valid_snapshot(
    lab: dict[str, LabKernel], label: str, cpu: str
) -> None:
    k = lab[label].at_cpu(cpu)
    assert k.rc("probe") == 0, (k.out / "probe.out").read_text()
    snap = load_snapshot(str(k.out / "host.json"))
    assert snap.source == "kvm"
    assert snap.kernel == k.release
    assert snap.taken is not None
    assert snap.qemu is not None and snap.qemu[0].isdigit(), "the rootfs has qemu-system-aarch64"
    conformance = k.read_json("conformance.json")
    fresh = {int(r, 16): int(v, 16) for r, v in conformance["fresh"].items()}
    assert snap.registers == fresh, "probe and conformance run read different registers"
    assert conformance["probe_fds_leaked"] == []


@pytest.mark.parametrize("label", LABELS)
def test_probed_snapshot_is_a_project_fixture(lab: dict[str, LabKernel], label: str) -> None:
    """tests/fixtures/lab/debian-<label>.json is what the lab probed (refresh: lab/refresh.py)."""
    k = lab[label]
    probed = k.read_json("host.json")
    path = fixture_path(label)
    assert path.exists(), f"missing {path.relative_to(REPO)}: run python3 lab/refresh_fixtures.py"
    fixture = json.loads(path.read_text())
    assert fixture["registers"] == probed["registers"], f"{k.release} differs from {path.name}"
    assert fixture["qemu"] == probed["qemu"]
    load_snapshot(str(path))
