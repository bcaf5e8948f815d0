#!/usr/bin/env python3
"""Build the arm64 KVM lab from Debian packages: one Python rootfs, four real arm64 kernels.

    python3 lab/build.py            # builds into lab/build/ (skips the steps already done)
    python3 lab/build.py --clean    # from scratch

Result (lab/build/): ``rootfs.cpio.zst`` (Debian trixie arm64 minbase with python3, QEMU and
libvirt), ``probe.bin`` and ``probe-hold.bin`` (the SMCCC probe guest, lab/guest/smccc/probe.s),
and for each kernel
``kernels/<release>/vmlinuz`` and ``kernels/<release>/initrd.img`` (the rootfs
followed by a small cpio with ``/init`` and the 9p modules), listed in ``kernels.json``.

arm64 packages come from a private apt configuration under lab/build/apt: the host's own apt
sources are read (for the mirror URI) and never changed. Host tools: debootstrap,
qemu-user-static, binfmt-support, cpio, kmod, zstd, qemu-system-arm, binutils-aarch64-linux-gnu
(scripts/apt-packages.txt).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

LAB = Path(__file__).resolve().parent
BUILD = LAB / "build"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"

# What the lab boots. Each entry: (label, suite, how to pick the image package).
#   "meta": the image linux-image-arm64 of that suite depends on;
#   a regex: the newest linux-image-<version>-arm64 of that suite whose version matches it.
KERNELS = (
    ("6.1", "bookworm", "meta"),
    ("6.12", "trixie", "meta"),
    ("6.18", "trixie-backports", r"^6\.18\."),
    ("7.x", "trixie-backports", r"^7\."),
)
SUITES = ("bookworm", "trixie", "trixie-backports")
ROOTFS_SUITE = "trixie"
ROOTFS_PACKAGES = ("python3", "kmod", "python3-yaml", "python3-jsonschema", "qemu-system-arm")
# A second QEMU, unpacked beside the rootfs's own under /opt/qemu-<version>: the newest one in
# trixie-backports (11.1 accepts a missing VENDOR_HYP_BMAP_2 whose value is 0; 10.0 does not).
EXTRA_QEMU_SUITE = "trixie-backports"
EXTRA_QEMU_PACKAGES = ("qemu-system-arm", "qemu-system-common", "qemu-system-data")
INITRD_MODULES = ("virtio_pci", "9pnet_virtio", "9p")
# libvirt in the rootfs, unpacked with dpkg-deb (../shared/reference/arm64-kvm-lab-libvirt.md,
# route B): debootstrap cannot install it (systemd in the same batch), and a chroot apt-get costs
# minutes. These are libvirtd, virtlogd, virsh, the qemu driver and python3-libvirt with the
# libraries they link (readelf -d) that the rootfs lacks, at ROOTFS_SUITE's versions; the users
# and groups their maintainer scripts would create are made by hand.
LIBVIRT_PACKAGES = (
    *("libvirt0", "libvirt-common", "libvirt-daemon", "libvirt-daemon-common"),
    *("libvirt-daemon-log", "libvirt-daemon-driver-qemu", "libvirt-clients", "python3-libvirt"),
    *("libxml2", "libtirpc3t64", "libtirpc-common", "dmidecode", "libapparmor1", "libssh-4"),
    *("libcurl3t64-gnutls", "libbrotli1", "libcom-err2", "libgssapi-krb5-2", "libk5crypto3"),
    *("libkeyutils1", "libkrb5-3", "libkrb5support0", "libldap2", "libnghttp2-14"),
    *("libnghttp3-9", "libngtcp2-16", "libngtcp2-crypto-gnutls8", "libpsl5t64", "librtmp1"),
    *("libssh2-1t64", "libjson-c5"),
)
# hvcpolicy's runtime dependencies that Debian trixie does not package (pyproject.toml's
# [project] dependencies of these names): pure-Python wheels, fetched with pip and unpacked into
# the rootfs's dist-packages.
GUEST_WHEELS = ("qemu.qmp",)
# The SMCCC probe guest (lab/guest/smccc/probe.s), assembled with the host's cross binutils.
PROBE_SOURCE = LAB / "guest" / "smccc" / "probe.s"
CROSS = "aarch64-linux-gnu-"

INIT = r"""#!/bin/sh
# hvcpolicy lab: mount the checkout shared over 9p and run the script the kernel command line names
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /tmp /run /mnt/host
mount -t tmpfs tmp /tmp
for m in virtio_pci 9pnet_virtio 9p; do modprobe $m; done
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 host0 /mnt/host
script=$(sed -n 's/.*hvclab\.script=\([^ ]*\).*/\1/p' /proc/cmdline)
echo "hvclab: kernel $(uname -r), running $script"
if [ -n "$script" ] && [ -f "/mnt/host/$script" ]; then
    sh "/mnt/host/$script"
    echo "hvclab: exit $?"
else
    echo "hvclab: no script"
fi
sync
umount /mnt/host
echo o > /proc/sysrq-trigger
sleep 30
"""


def log(msg: str) -> None:
    print(f"lab-build: {msg}", flush=True)


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, text=True, **kw)  # type: ignore[call-overload, no-any-return]


def mirror_uri() -> str:
    """The Debian archive URI the host already uses (from its own apt sources)."""
    candidates: list[tuple[str, str]] = []  # (uri, suites)
    srcdir = Path("/etc/apt/sources.list.d")
    files = sorted(srcdir.glob("*.sources")) if srcdir.is_dir() else []
    for f in files:
        for stanza in f.read_text().split("\n\n"):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line:
                    continue
                k, _, v = line.partition(":")
                fields[k.strip().lower()] = v.strip()
            if "deb" in fields.get("types", "").split() and "uris" in fields:
                for uri in fields["uris"].split():
                    candidates.append((uri, fields.get("suites", "")))
    lists = [Path("/etc/apt/sources.list"), *sorted(srcdir.glob("*.list"))]
    for f in lists:
        if not f.is_file():
            continue
        for line in f.read_text().splitlines():
            m = re.match(r"^\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", line)
            if m:
                candidates.append((m.group(1), m.group(2)))
    for uri, suites in candidates:
        names = suites.split()
        if any(re.fullmatch(r"[a-z]+(-updates)?", s) for s in names) and "security" not in uri:
            return uri.rstrip("/")
    raise SystemExit("lab-build: no Debian mirror found in /etc/apt/sources.list{,.d}")


class Apt:
    """apt-get/apt-cache for arm64 with a private configuration (the host's stays untouched)."""

    def __init__(self, root: Path, mirror: str) -> None:
        self.root = root
        for d in ("lists/partial", "cache/archives/partial", "etc/sources.list.d", "etc/prefs.d"):
            (root / d).mkdir(parents=True, exist_ok=True)
        (root / "status").touch()
        lines = [f"deb [arch=arm64 signed-by={KEYRING}] {mirror} {s} main" for s in SUITES]
        (root / "etc/sources.list").write_text("\n".join(lines) + "\n")
        conf = {
            "APT::Architecture": "arm64",
            "Dir::State": root,
            "Dir::State::Lists": root / "lists",
            "Dir::State::status": root / "status",
            "Dir::Cache": root / "cache",
            "Dir::Etc::SourceList": root / "etc/sources.list",
            "Dir::Etc::SourceParts": root / "etc/sources.list.d",
            "Dir::Etc::Preferences": root / "etc/preferences",
            "Dir::Etc::PreferencesParts": root / "etc/prefs.d",
            "Acquire::Languages": "none",
            "APT::Sandbox::User": "root",
        }
        text = "".join(f'{k} "{v}";\n' for k, v in conf.items())
        text += 'APT::Architectures { "arm64"; };\n'
        (root / "apt.conf").write_text(text)
        self.env = {**os.environ, "APT_CONFIG": str(root / "apt.conf"), "LC_ALL": "C"}

    def update(self) -> None:
        run(["apt-get", "update", "-qq"], env=self.env)

    def out(self, *args: str) -> str:
        cp = run(["apt-cache", *args], env=self.env, stdout=subprocess.PIPE)
        return cp.stdout

    def versions(self, pkg: str) -> list[tuple[str, str]]:
        """[(version, suite)] of a package, from apt-cache madison."""
        res = []
        for line in self.out("madison", pkg).splitlines():
            parts = [p.strip() for p in line.split("|")]
            if len(parts) >= 3 and parts[0] == pkg:
                suite = parts[2].split()[1].split("/")[0]
                res.append((parts[1], suite))
        return res

    def version_in(self, pkg: str, suite: str) -> str:
        for version, s in self.versions(pkg):
            if s == suite:
                return version
        raise SystemExit(f"lab-build: {pkg} not in {suite}")

    def depends(self, pkg: str, version: str) -> list[str]:
        for line in self.out("show", f"{pkg}={version}").splitlines():
            if line.startswith("Depends:"):
                return [d.split()[0].split(":")[0] for d in line[8:].replace("|", ",").split(",")]
        return []

    def download_many(self, pkgs: dict[str, str], dest: Path) -> list[Path]:
        """Several packages at given versions, in one apt-get call."""
        dest.mkdir(parents=True, exist_ok=True)
        run(
            ["apt-get", "download", "-qq", *(f"{p}={v}" for p, v in pkgs.items())],
            env=self.env,
            cwd=dest,
        )
        debs = []
        for pkg, version in pkgs.items():
            found = list(dest.glob(f"{pkg}_{version.replace(':', '%3a')}_*.deb"))
            if not found:
                raise SystemExit(f"lab-build: download of {pkg}={version} left no .deb")
            debs.append(found[0])
        return debs

    def download(self, pkg: str, version: str, dest: Path) -> Path:
        dest.mkdir(parents=True, exist_ok=True)
        run(["apt-get", "download", "-qq", f"{pkg}={version}"], env=self.env, cwd=dest)
        quoted = version.replace(":", "%3a")
        found = list(dest.glob(f"{pkg}_{quoted}_*.deb"))
        if not found:
            raise SystemExit(f"lab-build: download of {pkg}={version} left no .deb")
        return found[0]


def kernel_package(apt: Apt, suite: str, how: str) -> tuple[str, str]:
    if how == "meta":
        meta_version = apt.version_in("linux-image-arm64", suite)
        for dep in apt.depends("linux-image-arm64", meta_version):
            if dep.startswith("linux-image-") and dep.endswith("-arm64"):
                return dep, apt.version_in(dep, suite)
        raise SystemExit(f"lab-build: linux-image-arm64 in {suite} names no image")
    best: tuple[tuple[int, ...], str, str] | None = None
    for name in apt.out("pkgnames", "linux-image-").split():
        m = re.fullmatch(r"linux-image-(\d+\.\d+\.\d+)(?:\+deb\d+)?-arm64", name)
        if not m or not re.match(how, m.group(1)):
            continue
        for version, s in apt.versions(name):
            if s == suite:
                key = tuple(int(x) for x in m.group(1).split("."))
                if best is None or key > best[0]:
                    best = (key, name, version)
    if best is None:
        raise SystemExit(f"lab-build: no kernel matching {how} in {suite}")
    return best[1], best[2]


def ensure_binfmt() -> None:
    if Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        return
    if not Path("/proc/sys/fs/binfmt_misc/register").exists():
        run(["mount", "-t", "binfmt_misc", "binfmt_misc", "/proc/sys/fs/binfmt_misc"])
    run(["update-binfmts", "--enable", "qemu-aarch64"])
    if not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        raise SystemExit("lab-build: cannot register qemu-aarch64 with binfmt_misc")


def unmount_under(path: Path) -> None:
    """An interrupted debootstrap leaves proc/sys mounted inside the rootfs: never rmtree those."""
    prefix = str(path.resolve()) + "/"
    with open("/proc/mounts") as f:
        points = [line.split()[1] for line in f if line.split()[1].startswith(prefix)]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False)


def build_rootfs(apt: Apt, mirror: str) -> None:
    rootfs = BUILD / "rootfs"
    stamp = BUILD / "rootfs.stamp"
    if stamp.exists():
        return
    ensure_binfmt()
    if rootfs.exists():
        unmount_under(rootfs)
        shutil.rmtree(rootfs)
    t = time.monotonic()
    log(f"debootstrap {ROOTFS_SUITE} arm64 ...")
    run(
        [
            "debootstrap",
            "--arch=arm64",
            "--variant=minbase",
            f"--include={','.join(ROOTFS_PACKAGES)}",
            f"--keyring={KEYRING}",
            ROOTFS_SUITE,
            str(rootfs),
            mirror,
        ],
        stdout=subprocess.DEVNULL,
    )
    log(f"debootstrap took {time.monotonic() - t:.0f} s")
    # The newest QEMU of EXTRA_QEMU_SUITE, unpacked aside (its libraries are the suite's own).
    first = EXTRA_QEMU_PACKAGES[0]
    version = apt.version_in(first, EXTRA_QEMU_SUITE)
    debs = BUILD / "debs"
    opt = rootfs / "opt" / f"qemu-{version.split(':')[-1].split('+')[0]}"
    opt.mkdir(parents=True, exist_ok=True)
    for pkg in EXTRA_QEMU_PACKAGES:
        deb = apt.download(pkg, apt.version_in(pkg, EXTRA_QEMU_SUITE), debs)
        run(["dpkg-deb", "-x", str(deb), str(opt)])
    # Keep the rootfs small: documentation, locales and apt lists are of no use in the lab.
    for junk in ("usr/share/doc", "usr/share/man", "usr/share/locale", "var/lib/apt/lists"):
        shutil.rmtree(rootfs / junk, ignore_errors=True)
    for opt_junk in ("usr/share/doc", "usr/share/man"):
        shutil.rmtree(opt / opt_junk, ignore_errors=True)
    stamp.write_text(version + "\n")
    (BUILD / "libvirt.stamp").unlink(missing_ok=True)
    (BUILD / "wheels.stamp").unlink(missing_ok=True)


def add_libvirt(apt: Apt) -> None:
    """libvirt into the rootfs by dpkg-deb -x, plus what its maintainer scripts would do."""
    stamp = BUILD / "libvirt.stamp"
    if stamp.exists():
        return
    t = time.monotonic()
    rootfs = BUILD / "rootfs"
    debs = BUILD / "debs-libvirt"
    versions = {pkg: apt.version_in(pkg, ROOTFS_SUITE) for pkg in LIBVIRT_PACKAGES}
    for deb in apt.download_many(versions, debs):
        run(["dpkg-deb", "-x", str(deb), str(rootfs)])

    def chroot(*cmd: str) -> None:
        run(["chroot", str(rootfs), *cmd])

    chroot("groupadd", "-f", "--system", "kvm")
    chroot("groupadd", "-f", "--system", "libvirt")
    chroot("groupadd", "-f", "--system", "--gid", "64055", "libvirt-qemu")
    known = subprocess.run(["chroot", str(rootfs), "id", "libvirt-qemu"], capture_output=True)
    if known.returncode:
        chroot(
            *("useradd", "--system", "--uid", "64055", "--gid", "kvm", "--groups"),
            *("libvirt-qemu", "--home-dir", "/var/lib/libvirt", "--no-create-home"),
            *("--shell", "/usr/sbin/nologin", "libvirt-qemu"),
        )
    qemu_lib = rootfs / "var/lib/libvirt/qemu"
    qemu_lib.mkdir(parents=True, exist_ok=True)
    os.chown(qemu_lib, 64055, 64055)
    qemu_lib.chmod(0o750)
    for d in ("var/cache/libvirt", "var/cache/libvirt/qemu", "var/lib/libvirt/images"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
        (rootfs / d).chmod(0o711)
    (rootfs / "etc/libvirt/qemu.conf").chmod(0o600)
    chroot("ldconfig")
    # debootstrap leaves its .deb files (57 MB) in the apt cache: a third of the initrd.
    for junk in ("usr/share/doc", "usr/share/man", "usr/share/locale", "var/cache/apt/archives"):
        shutil.rmtree(rootfs / junk, ignore_errors=True)
    stamp.write_text(json.dumps(versions, indent=1) + "\n")
    log(f"libvirt {versions['libvirt0']} unpacked into the rootfs in {time.monotonic() - t:.0f} s")


def add_wheels() -> None:
    """GUEST_WHEELS, at the versions pyproject.toml asks for, into the rootfs."""
    stamp = BUILD / "wheels.stamp"
    pyproject = (LAB.parent / "pyproject.toml").read_text()
    specs = []
    for name in GUEST_WHEELS:
        m = re.search(rf'"({re.escape(name)}[^"]*)"', pyproject)
        if m is None:
            raise SystemExit(f"lab-build: {name} is not a dependency in pyproject.toml")
        specs.append(m.group(1))
    if stamp.exists() and stamp.read_text() == "\n".join(specs) + "\n":
        return
    wheels = BUILD / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    pip = (sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:")
    run([*pip, "--dest", str(wheels), *specs])
    site = BUILD / "rootfs/usr/lib/python3/dist-packages"
    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as z:
            z.extractall(site)
    stamp.write_text("\n".join(specs) + "\n")
    log(f"wheels unpacked into the rootfs: {', '.join(p.name for p in wheels.glob('*.whl'))}")


def build_probe() -> None:
    """lab/build/probe.bin: the SMCCC probe as a raw arm64 Image (QEMU -kernel boots it), and
    probe-hold.bin: the same without the final power-off (libvirt_start.py)."""
    source = PROBE_SOURCE.read_bytes()
    stamp = BUILD / "probe.source"
    outs = {"probe": [], "probe-hold": ["--defsym", "HOLD=1"]}
    built = all((BUILD / f"{name}.bin").exists() for name in outs)
    if built and stamp.exists() and stamp.read_bytes() == source:
        return
    work = BUILD / "probe"
    work.mkdir(exist_ok=True)
    for name, defs in outs.items():
        obj, elf, out = work / f"{name}.o", work / f"{name}.elf", BUILD / f"{name}.bin"
        run([f"{CROSS}as", *defs, "-o", str(obj), str(PROBE_SOURCE)])
        run([f"{CROSS}ld", "-Ttext=0", "-o", str(elf), str(obj)])
        run([f"{CROSS}objcopy", "-O", "binary", str(elf), str(out)])
        log(f"{out.name} assembled ({out.stat().st_size} bytes)")
    stamp.write_bytes(source)


def pack_rootfs() -> None:
    out = BUILD / "rootfs.cpio.zst"
    newest = max((BUILD / f).stat().st_mtime for f in ("libvirt.stamp", "wheels.stamp"))
    if out.exists() and out.stat().st_mtime >= newest:
        return
    t = time.monotonic()
    tmp = out.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        find = subprocess.Popen(["find", "."], cwd=BUILD / "rootfs", stdout=subprocess.PIPE)
        cpio = subprocess.Popen(
            ["cpio", "-o", "-H", "newc", "--quiet"],
            cwd=BUILD / "rootfs",
            stdin=find.stdout,
            stdout=subprocess.PIPE,
        )
        zstd = subprocess.Popen(["zstd", "-3", "-T0", "-q"], stdin=cpio.stdout, stdout=f)
        assert find.stdout is not None and cpio.stdout is not None
        find.stdout.close()
        cpio.stdout.close()
        if zstd.wait() or cpio.wait() or find.wait():
            raise SystemExit("lab-build: packing the rootfs failed")
    tmp.rename(out)
    log(f"packed rootfs ({out.stat().st_size >> 20} MiB) in {time.monotonic() - t:.0f} s")


def module_closure(moddir: Path, names: tuple[str, ...]) -> list[str]:
    """Paths (relative to moddir) of the named modules and everything they depend on."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        base = Path(path).name.split(".ko")[0].replace("-", "_")
        by_name[base] = path
    todo = [by_name[n] for n in names if n in by_name]
    seen: list[str] = []
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.append(p)
            todo.extend(deps.get(p, []))
    return seen


def build_kernel(apt: Apt, label: str, suite: str, how: str) -> dict[str, str]:
    pkg, version = kernel_package(apt, suite, how)
    release = pkg[len("linux-image-") :]
    kdir = BUILD / "kernels" / release
    stamp = kdir / "stamp"
    info = {"label": label, "suite": suite, "package": pkg, "version": version, "release": release}
    if stamp.exists():
        return info
    t = time.monotonic()
    # Newer kernels split the image package: linux-binary-* (vmlinuz), linux-modules-*.
    parts = [pkg] + [
        d for d in apt.depends(pkg, version) if d.startswith(("linux-binary-", "linux-modules-"))
    ]
    tree = kdir / "tree"
    kdir.mkdir(parents=True, exist_ok=True)
    if tree.exists():
        shutil.rmtree(tree)
    for part in parts:
        deb = apt.download(part, version, BUILD / "debs")
        run(["dpkg-deb", "-x", str(deb), str(tree)])
    # bookworm..6.18 ship boot/vmlinuz-<release>; 7.x ships usr/lib/modules/<release>/vmlinuz.
    images = [*tree.glob("boot/vmlinuz-*"), *tree.glob(f"usr/lib/modules/{release}/vmlinuz")]
    if not images:
        raise SystemExit(f"lab-build: no vmlinuz in {pkg}")
    vmlinuz = images[0]
    shutil.copyfile(vmlinuz, kdir / "vmlinuz")
    # bookworm's kernels ship lib/modules, trixie's usr/lib/modules; the host's depmod (bookworm)
    # looks under BASE/lib/modules.
    base = tree if (tree / "lib/modules" / release).is_dir() else tree / "usr"
    src_mods = base / "lib/modules" / release
    run(["depmod", "-b", str(base), release])
    stage = kdir / "initrd-extra"
    if stage.exists():
        shutil.rmtree(stage)
    dst_mods = stage / "usr/lib/modules" / release
    for rel in module_closure(src_mods, INITRD_MODULES):
        (dst_mods / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src_mods / rel, dst_mods / rel)
    for f in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        if (src_mods / f).exists():
            shutil.copyfile(src_mods / f, dst_mods / f)
    run(["depmod", "-b", str(stage / "usr"), release])
    (stage / "init").write_text(INIT)
    (stage / "init").chmod(0o755)
    extra = kdir / "extra.cpio"
    with open(extra, "wb") as f:
        files = subprocess.run(
            ["find", "init", "usr"], cwd=stage, check=True, stdout=subprocess.PIPE
        ).stdout
        subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet"], cwd=stage, input=files, stdout=f, check=True
        )
    shutil.rmtree(tree)
    info["seconds"] = f"{time.monotonic() - t:.0f}"
    stamp.write_text(json.dumps(info) + "\n")
    log(f"kernel {release} ({pkg} {version} from {suite}) ready")
    return info


def assemble_initrds(kernels: list[dict[str, str]]) -> None:
    rootfs = BUILD / "rootfs.cpio.zst"
    for k in kernels:
        kdir = BUILD / "kernels" / k["release"]
        out = kdir / "initrd.img"
        if out.exists() and out.stat().st_mtime >= rootfs.stat().st_mtime:
            continue
        tmp = out.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            for part in (rootfs, kdir / "extra.cpio"):
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, f, 1 << 20)
                # The kernel takes a cpio that follows a compressed one only at a 4-byte
                # boundary (zeros between archives are skipped).
                f.write(b"\0" * (-f.tell() % 4))
        tmp.rename(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--clean", action="store_true", help="remove lab/build first")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("lab-build: needs root (debootstrap, binfmt_misc)")
    tools = ("debootstrap", "cpio", "depmod", "zstd", "dpkg-deb", "qemu-system-aarch64")
    for tool in (*tools, f"{CROSS}as", f"{CROSS}ld", f"{CROSS}objcopy"):
        if shutil.which(tool) is None:
            raise SystemExit(f"lab-build: {tool} missing (bash scripts/setup.sh installs it)")
    if args.clean and BUILD.exists():
        unmount_under(BUILD)
        shutil.rmtree(BUILD)
    BUILD.mkdir(exist_ok=True)
    t0 = time.monotonic()
    mirror = mirror_uri()
    apt = Apt(BUILD / "apt", mirror)
    apt.update()
    kernels = [build_kernel(apt, *k) for k in KERNELS]
    build_rootfs(apt, mirror)
    add_libvirt(apt)
    add_wheels()
    pack_rootfs()
    build_probe()
    assemble_initrds(kernels)
    (BUILD / "kernels.json").write_text(json.dumps(kernels, indent=1) + "\n")
    log(f"lab ready in {time.monotonic() - t0:.0f} s: " + ", ".join(k["release"] for k in kernels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
