"""The packages: the .deb builds with dpkg-buildpackage and, installed on this machine, gives a
working ``hvcpolicy`` and hook; the .rpm builds with rpmbuild. Run as root (CI does)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.libvirt.conftest import machine_lock

REPO = Path(__file__).resolve().parents[2]
VERSION = "0.1.0"
# Debian's own tools and Python, whatever the developer's PATH puts first
DEBIAN_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LC_ALL": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
}
SKIP_DIRS = {".git", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis"}
SKIP_TOP = {"lab", "bench", "build", "dist", ".venv", "debian"}
DOMAIN = """<domain type='qemu'>
  <name>pkg-guest</name>
  <uuid>6a1f2c3d-0000-4000-8000-000000000001</uuid>
  <metadata>
    <hvc:policy xmlns:hvc="https://hvcpolicy.dev/xmlns/libvirt/1" ref="{ref}"/>
  </metadata>
  <memory unit='KiB'>131072</memory>
</domain>
"""


def run(cmd: list[str], cwd: Path | None = None, timeout: float = 600, **kw: object) -> str:
    done = subprocess.run(
        cmd,
        cwd=cwd,
        env=DEBIAN_ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,  # type: ignore[arg-type]
    )
    assert done.returncode == 0, f"{cmd} -> {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr}"
    return done.stdout


def source_tree(dest: Path) -> Path:
    """The source tree as a release tarball would hold it."""

    def ignore(directory: str, names: list[str]) -> set[str]:
        top = Path(directory) == REPO
        return {n for n in names if n in SKIP_DIRS or (top and n in SKIP_TOP)}

    src = dest / f"hvcpolicy-{VERSION}"
    shutil.copytree(REPO, src, ignore=ignore)
    return src


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("deb")
    src = source_tree(work)
    shutil.copytree(src / "packaging" / "debian", src / "debian")
    run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=src)
    out = work / f"hvcpolicy_{VERSION}_all.deb"
    assert out.exists()
    return out


def test_deb_contents(deb: Path) -> None:
    files = run(["dpkg-deb", "-c", str(deb)])
    for path in (
        "./usr/bin/hvcpolicy",
        "./etc/libvirt/hooks/qemu.d/hvcpolicy",
        "./etc/hvcpolicy/hook.conf",
        "./etc/hvcpolicy/policies/",
        "./usr/share/hvcpolicy/schemas/policy.schema.json",
        "./usr/lib/python3/dist-packages/hvcpolicy/schemas/policy.schema.json",
        "./usr/lib/python3/dist-packages/hvcpolicy/hook/entry.py",
        "./lib/systemd/system/hvcpolicy-probe.service",
    ):
        assert path in files, path
    info = run(["dpkg-deb", "-I", str(deb)])
    assert "python3-yaml" in info and "python3-jsonschema" in info


@pytest.fixture()
def installed(deb: Path, tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.fail("installing the .deb needs root (CI runs as root)")
    if subprocess.run(["dpkg", "-s", "hvcpolicy"], capture_output=True).returncode == 0:
        pytest.fail("an hvcpolicy package is already installed here: not touching it")
    with machine_lock():  # the package installs into /etc/libvirt/hooks, as the tests do
        saved = {p: _read(p) for p in ("/etc/libvirt/hooks/qemu.d/hvcpolicy",)}
        run(["dpkg", "-i", "--force-confnew", str(deb)], timeout=300)
        try:
            yield tmp_path
        finally:
            run(["dpkg", "--purge", "hvcpolicy"], timeout=300)
            for path, data in saved.items():
                if data is not None:
                    Path(path).parent.mkdir(parents=True, exist_ok=True)
                    Path(path).write_bytes(data)
                    os.chmod(path, 0o755)


def _read(path: str) -> bytes | None:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        return None


def hook(*args: str, stdin: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/etc/libvirt/hooks/qemu.d/hvcpolicy", *args],
        input=stdin,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LC_ALL": "C"},
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_installed_deb_gives_a_working_command_and_hook(installed: Path) -> None:
    tmp = installed
    out = run(["/usr/bin/hvcpolicy", "--version"])
    assert out.strip() == f"hvcpolicy {VERSION}"
    run(["/usr/bin/hvcpolicy", "validate", str(REPO / "examples" / "policies")])
    # point the installed hook's config (a conffile, removed on purge) at test files
    policies = tmp / "policies"
    policies.mkdir()
    shutil.copy(REPO / "examples" / "policies" / "fleet-2026.yaml", policies)
    (policies / "future.json").write_text(
        '{"apiVersion": "hvcpolicy/v1", "kind": "FirmwarePolicy", "metadata": '
        '{"name": "future"}, "spec": {"features": {"0x6030000000160004:0": "require"}}}'
    )
    shutil.copy(REPO / "examples" / "hosts" / "neoverse-n1_linux-6.18.json", tmp / "host.json")
    Path("/etc/hvcpolicy/hook.conf").write_text(
        f"policy_dir = {policies}\nhost_snapshot = {tmp / 'host.json'}\n"
        f"cache_dir = {tmp / 'cache'}\naudit_file = {tmp / 'audit.log'}\n"
    )
    assert hook("pkg-guest", "stopped", "end", "-", stdin="").returncode == 0
    ok = hook("pkg-guest", "prepare", "begin", "-", stdin=DOMAIN.format(ref="fleet-2026"))
    assert ok.returncode == 0, ok.stderr
    moved = hook("pkg-guest", "migrate", "begin", "-", stdin=DOMAIN.format(ref="fleet-2026"))
    assert moved.returncode == 0 and moved.stdout == "", moved.stderr
    refused = hook("pkg-guest", "prepare", "begin", "-", stdin=DOMAIN.format(ref="future"))
    assert refused.returncode == 1
    assert "requires 0x6030000000160004:0" in refused.stderr
    audit = (tmp / "audit.log").read_text()
    assert "domain=pkg-guest" in audit and "outcome=refused" in audit
    # the first run validated with Debian's PyYAML/jsonschema and cached the result
    assert (tmp / "cache" / "fleet-2026.json").exists()


def test_rpm_builds(tmp_path: Path) -> None:
    src = source_tree(tmp_path / "src")
    top = tmp_path / "rpmbuild"
    (top / "SOURCES").mkdir(parents=True)
    with tarfile.open(top / "SOURCES" / f"hvcpolicy-{VERSION}.tar.gz", "w:gz") as tar:
        tar.add(src, arcname=src.name)
    run(
        [
            "rpmbuild", "-bb", "--nodeps",
            "--define", f"_topdir {top}",
            str(src / "packaging" / "rpm" / "hvcpolicy.spec"),
        ]
    )  # fmt: skip
    rpms = list((top / "RPMS" / "noarch").glob(f"hvcpolicy-{VERSION}-1*.noarch.rpm"))
    assert len(rpms) == 1
    files = run(["rpm", "-qlp", str(rpms[0])])
    for path in (
        "/usr/bin/hvcpolicy",
        "/etc/libvirt/hooks/qemu.d/hvcpolicy",
        "/etc/hvcpolicy/hook.conf",
        "/usr/lib/systemd/system/hvcpolicy-probe.service",
        "/usr/share/hvcpolicy/schemas/policy.schema.json",
    ):
        assert path in files, path
    assert "/site-packages/hvcpolicy/hook/entry.py" in files
