"""Policies and domain XML the apply tests write into their own directory."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

PSCI, WA1 = 0x6030000000140000, 0x6030000000140001
STD, STD_HYP, VENDOR, VENDOR2 = (0x6030000000160000 + i for i in range(4))


def write_policy(
    directory: Path,
    name: str,
    features: Mapping[str, str],
    unknown: str = "deny",
    psci: str | None = None,
    unsupported_qemu: str = "refuse",
    already_running: str = "refuse",
) -> Path:
    lines = [
        "apiVersion: hvcpolicy/v1",
        "kind: FirmwarePolicy",
        "metadata:",
        f"  name: {name}",
        "spec:",
        "  features:",
        *(f"    {k}: {v}" for k, v in features.items()),
        f"  unknown: {unknown}",
    ]
    if psci is not None:
        lines += ["  psci:", f'    version: "{psci}"']
    lines += [
        "  enforcement:",
        f"    unsupported-qemu: {unsupported_qemu}",
        f"    already-running: {already_running}",
    ]
    path = directory / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def portable(directory: Path, name: str = "portable", **kw: str) -> Path:
    """Starts on every modelled kernel (4.14 up): hides pv-time and ptp, pins PSCI 1.0."""
    features = {"trng": "allow", "pv-time": "deny", "kvm-features": "allow", "ptp": "deny"}
    return write_policy(directory, name, features, psci="1.0", **kw)


def domain_xml(
    ref: str, socket: Path | None, applied: Mapping[int, int] | None = None, name: str = "web1"
) -> str:
    parts = [
        "<domain type='kvm'>",
        f"  <name>{name}</name>",
        "  <uuid>6c1b7a1e-3f0c-4c52-9a51-1f6b0e1e0001</uuid>",
        "  <metadata>",
        f'    <hvc:policy xmlns:hvc="https://hvcpolicy.dev/xmlns/libvirt/1" ref="{ref}">',
    ]
    if socket is not None:
        parts.append(f'      <hvc:qmp socket="{socket}"/>')
    if applied is not None:
        parts.append('      <hvc:applied host="src" kernel="5.10.0" at="2026-11-24T23:00:00Z">')
        parts += [
            f'        <hvc:register id="0x{r:016x}" value="0x{v:x}"/>' for r, v in applied.items()
        ]
        parts.append("      </hvc:applied>")
    parts += [
        "    </hvc:policy>",
        "  </metadata>",
        "  <memory unit='MiB'>256</memory>",
        "  <vcpu>1</vcpu>",
        "  <os><type arch='aarch64' machine='virt'>hvm</type></os>",
        "</domain>",
    ]
    return "\n".join(parts) + "\n"
