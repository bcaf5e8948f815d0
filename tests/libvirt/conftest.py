"""A real libvirt for the hook tests: the system libvirtd (with virtlogd), a second unprivileged
``qemu:///session`` libvirtd with its own host_uuid as a migration target, the hook installed by
``hvcpolicy install-hook``, and TCG aarch64 guests whose firmware-register QMP interface is served
by ``hvcpolicy simulate --upstream`` over the real QEMU's second QMP socket.

Daemons are started by these fixtures with their own pid files and stopped by pid (checked to be
the process we started); every wait is bounded. A daemon already running is used, never stopped.

The hook is shared by both daemons (libvirt reads /etc/libvirt/hooks for the session daemon too),
so it runs Debian's /usr/bin/python3 on a world-readable copy of the package; each daemon gets its
own config (the session user's ~/.config/hvcpolicy/hook.conf), hence its own host snapshot.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
HOOK_PYTHON = "/usr/bin/python3"
HOOKS_DIR = "/etc/libvirt/hooks"
SYSTEM_URI = "qemu:///system"
SYSTEM_QMP_DIR = "/var/lib/libvirt/qemu/hvcpolicy"
SESSION_USER = "hvcpolicy-test"
SESSION_HOME = Path("/var/lib/hvcpolicy-test")
SESSION_SOCK = SESSION_HOME / ".cache/libvirt/libvirt-sock"
SESSION_URI = f"qemu+unix:///session?socket={SESSION_SOCK}"
MIGRATION_PORT = 49200
SIM_KERNEL = "6.18"
HOSTS = REPO / "examples" / "hosts"
NS = "https://hvcpolicy.dev/xmlns/libvirt/1"


def run(cmd: list[str], timeout: float = 60, check: bool = True, **kw: Any) -> Any:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and done.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} -> {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"
        )
    return done


def virsh(uri: str, *args: str, check: bool = True, timeout: float = 90) -> Any:
    return run(["virsh", "-q", "-c", uri, *args], timeout=timeout, check=check)


def wait_for(cond: Callable[[], object], timeout: float, what: str, step: float = 0.1) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


def _comm(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def pid_from(pidfile: Path, comm: str) -> int | None:
    """The pid in ``pidfile`` when that process is alive and is ``comm``."""
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _comm(pid) == comm else None


def stop_pid(pid: int, comm: str, timeout: float = 20) -> None:
    """SIGTERM the process we started (checked by name first), then SIGKILL after ``timeout``."""
    if _comm(pid) != comm:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _comm(pid) == comm and time.monotonic() < deadline:
        time.sleep(0.1)
    if _comm(pid) == comm:
        os.kill(pid, signal.SIGKILL)


# --- the test tree ------------------------------------------------------------------------------


@dataclass
class Lab:
    root: Path
    pkg: Path  # world-readable copy of the package: what the installed hook runs
    policies: Path
    system: Path  # the system daemon's hook files: host.json, cache/, audit.log, hook.conf
    session: Path  # the session daemon's
    sims: list[subprocess.Popen[bytes]] = field(default_factory=list)
    install_args: list[str] = field(default_factory=list)  # how the system hook was installed

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(self.pkg)
        env["HVCPOLICY_POLICY_DIR"] = str(self.policies)
        env["HVCPOLICY_HOST_SNAPSHOT"] = str(self.system / "host.json")
        return env

    def hvcpolicy(self, *args: str, check: bool = True, timeout: float = 60) -> Any:
        return run(
            [sys.executable, "-m", "hvcpolicy", *args],
            timeout=timeout,
            check=check,
            env=self.env(),
            cwd="/",  # -m puts the cwd first on sys.path: run the copy, not the checkout
        )

    def audit(self, daemon: str = "system") -> list[str]:
        path = (self.system if daemon == "system" else self.session) / "audit.log"
        return path.read_text().splitlines() if path.exists() else []

    def set_host(
        self, daemon: str, fixture: str, host: str, registers: dict[str, str] | None = None
    ) -> None:
        """This daemon's host snapshot: a fixture host renamed (snapshot files are per host),
        with ``registers`` (id -> 0x value) in place of the fixture's."""
        doc = json.loads((HOSTS / fixture).read_text())
        doc["host"] = host
        doc["registers"].update(registers or {})
        target = (self.system if daemon == "system" else self.session) / "host.json"
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        tmp.chmod(0o644)
        tmp.replace(target)

    def write_policy(self, name: str, spec: dict[str, object]) -> None:
        doc = {
            "apiVersion": "hvcpolicy/v1",
            "kind": "FirmwarePolicy",
            "metadata": {"name": name},
            "spec": spec,
        }
        path = self.policies / f"{name}.json"
        path.write_text(json.dumps(doc, indent=2))
        path.chmod(0o644)


POLICIES: dict[str, dict[str, object]] = {
    # ptp denied: a fresh guest differs (VENDOR_HYP_BMAP 0x3 -> 0x1)
    "web": {
        "features": {"kvm-features": "require", "ptp": "deny", "trng": "allow", "pv-time": "allow"},
        "unknown": "allow",
    },
    # everything the host offers: a fresh guest already conforms
    "open": {"unknown": "allow"},
    # a register no host in the fixtures has (a bitmap of some future kernel)
    "needs-future": {"features": {"0x6030000000160004:0": "require"}, "unknown": "allow"},
}


def _copy_package(dest: Path) -> None:
    import qemu.qmp

    shutil.copytree(
        REPO / "hvcpolicy", dest / "hvcpolicy", ignore=shutil.ignore_patterns("__pycache__")
    )
    # qemu.qmp beside hvcpolicy, as the .deb ships it: the hook's Python (Debian's) has no
    # package of it, and the hook's QMP stages speak QMP through it
    shutil.copytree(
        Path(qemu.qmp.__file__).resolve().parent.parent,
        dest / "qemu",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    (dest / "hooks").mkdir()
    shutil.copy2(REPO / "hooks" / "qemu", dest / "hooks" / "qemu")
    # byte-compiled, as a package install leaves it: a process that may not write bytecode
    # (PYTHONDONTWRITEBYTECODE, or another user) would compile every module on every run
    run([HOOK_PYTHON, "-m", "compileall", "-q", str(dest / "hvcpolicy"), str(dest / "qemu")])
    for dirpath, _dirs, filenames in os.walk(dest):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)
    os.chmod(dest / "hooks" / "qemu", 0o755)


def _session_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(SESSION_USER)
    except KeyError:
        run(
            [
                "useradd", "--system", "--create-home", "--home-dir", str(SESSION_HOME),
                "--shell", "/usr/sbin/nologin", SESSION_USER,
            ]
        )  # fmt: skip
        return pwd.getpwnam(SESSION_USER)


LOCK = "/run/lock/hvcpolicy-libvirt-tests.lock"
LOCK_WAIT = 900
_lock_depth = 0


@contextlib.contextmanager
def machine_lock() -> Iterator[None]:
    """One user of this machine's libvirtd, hooks dir and /etc/hvcpolicy at a time: another
    test run (or bench) waits here, bounded, instead of stopping the daemon under us."""
    import fcntl

    global _lock_depth
    if _lock_depth:  # this process holds it already (flock would wait on ourselves)
        _lock_depth += 1
        try:
            yield
        finally:
            _lock_depth -= 1
        return
    os.makedirs(os.path.dirname(LOCK), exist_ok=True)
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"{LOCK} held by another run for {LOCK_WAIT} s")
                time.sleep(0.5)
        _lock_depth = 1
        yield
    finally:
        _lock_depth = 0
        os.close(fd)  # releases the lock


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.fail("the libvirt tests run as root (CI does): they start the system libvirtd")
    with machine_lock():
        yield from _lab()


def _lab() -> Iterator[Lab]:
    user = _session_user()
    root = Path(tempfile.mkdtemp(prefix="hvcpolicy-libvirt-", dir="/var/tmp"))
    root.chmod(0o755)
    lab = Lab(root, root / "pkg", root / "policies", root / "system", root / "session")
    for d in (lab.pkg, lab.policies, lab.system, lab.session, root / "sim"):
        d.mkdir(mode=0o755)
        d.chmod(0o755)
    _copy_package(lab.pkg)
    for name, spec in POLICIES.items():
        lab.write_policy(name, spec)
    lab.set_host("system", "neoverse-n1_linux-6.18.json", "lab-source")
    lab.set_host("session", "neoverse-n1_linux-6.18.json", "lab-destination")
    os.chown(lab.session, user.pw_uid, user.pw_gid)
    # The hook, for both daemons; the system config is the machine's (restored afterwards).
    saved_conf = _save("/etc/hvcpolicy/hook.conf")
    hook_path = Path(HOOKS_DIR) / "qemu.d" / "hvcpolicy"
    saved_hook = _save(str(hook_path))
    common = ["--python", HOOK_PYTHON, "--policy-dir", str(lab.policies)]
    lab.install_args = [
        "install-hook", *common,
        "--hooks-dir", HOOKS_DIR,
        "--host-snapshot", str(lab.system / "host.json"),
        "--cache-dir", str(lab.system / "cache"),
        "--audit-file", str(lab.system / "audit.log"),
    ]  # fmt: skip
    lab.hvcpolicy(*lab.install_args, "--no-reload")
    user_conf = SESSION_HOME / ".config/hvcpolicy/hook.conf"
    lab.hvcpolicy(
        "install-hook", *common,
        "--hooks-dir", str(root / "unused-hooks"),
        "--config", str(user_conf),
        "--host-snapshot", str(lab.session / "host.json"),
        "--cache-dir", str(lab.session / "cache"),
        "--audit-file", str(lab.session / "audit.log"),
        "--no-reload",
    )  # fmt: skip
    (lab.session / "cache").mkdir(exist_ok=True)
    for path in (lab.session / "cache", *(lab.session / "cache").iterdir()):
        os.chown(path, user.pw_uid, user.pw_gid)
    try:
        yield lab
    finally:
        for proc in lab.sims:
            _stop_popen(proc)
        _restore(str(hook_path), saved_hook)
        _restore("/etc/hvcpolicy/hook.conf", saved_conf)
        with contextlib.suppress(OSError):
            user_conf.unlink()
        shutil.rmtree(root, ignore_errors=True)


def _save(path: str) -> bytes | None:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        return None


def _restore(path: str, data: bytes | None) -> None:
    p = Path(path)
    if data is None:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    else:
        p.write_bytes(data)


def _stop_popen(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# --- the daemons --------------------------------------------------------------------------------


@dataclass
class Daemon:
    uri: str
    pidfile: Path
    start: Callable[[], None]
    owned: bool = False

    def pid(self) -> int | None:
        return pid_from(self.pidfile, "libvirtd")


def _start_system() -> None:
    if pid_from(Path("/run/virtlogd.pid"), "virtlogd") is None:
        run(["/usr/sbin/virtlogd", "-d"], timeout=30)
    run(["/usr/sbin/libvirtd", "-d"], timeout=30)
    # the first start probes QEMU's capabilities (~15 s); later ones take ~0.1 s
    wait_for(
        lambda: virsh(SYSTEM_URI, "list", "--all", check=False, timeout=30).returncode == 0,
        120,
        "the system libvirtd",
        0.2,
    )


@pytest.fixture(scope="session")
def system_libvirtd(lab: Lab) -> Iterator[Daemon]:
    daemon = Daemon(SYSTEM_URI, Path("/run/libvirtd.pid"), _start_system)
    started_virtlogd = pid_from(Path("/run/virtlogd.pid"), "virtlogd") is None
    if daemon.pid() is None:
        _start_system()
        daemon.owned = True
    else:  # someone else's: make it see the hook
        os.kill(daemon.pid() or 0, signal.SIGHUP)
    os.makedirs(SYSTEM_QMP_DIR, exist_ok=True)
    qemu = pwd.getpwnam("libvirt-qemu")
    os.chown(SYSTEM_QMP_DIR, qemu.pw_uid, qemu.pw_gid)
    os.chmod(SYSTEM_QMP_DIR, 0o750)
    try:
        yield daemon
    finally:
        _undefine_all(SYSTEM_URI, "hvct-")
        if daemon.owned and (pid := daemon.pid()) is not None:
            stop_pid(pid, "libvirtd")
            if started_virtlogd and (vpid := pid_from(Path("/run/virtlogd.pid"), "virtlogd")):
                stop_pid(vpid, "virtlogd")


def _session_env() -> dict[str, str]:
    return {
        "HOME": str(SESSION_HOME),
        "USER": SESSION_USER,
        "LOGNAME": SESSION_USER,
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "LC_ALL": "C",
    }


def _start_session() -> None:
    user = pwd.getpwnam(SESSION_USER)
    conf_dir = SESSION_HOME / ".config/libvirt"
    conf_dir.mkdir(parents=True, exist_ok=True)
    conf = conf_dir / "libvirtd.conf"
    if not conf.exists():
        conf.write_text(f'host_uuid = "{uuid.uuid4()}"\n')
    for path in (SESSION_HOME / ".config", conf_dir, conf):
        os.chown(path, user.pw_uid, user.pw_gid)
    run(
        ["/usr/sbin/libvirtd", "-d", "-p", str(SESSION_HOME / "libvirtd-test.pid")],
        timeout=30,
        user=user.pw_uid,
        group=user.pw_gid,
        extra_groups=[],
        env=_session_env(),
        cwd="/",
    )
    wait_for(
        lambda: virsh(SESSION_URI, "list", "--all", check=False, timeout=30).returncode == 0,
        120,
        "the session libvirtd",
        0.2,
    )


@pytest.fixture(scope="session")
def session_libvirtd(lab: Lab, system_libvirtd: Daemon) -> Iterator[Daemon]:
    daemon = Daemon(SESSION_URI, SESSION_HOME / "libvirtd-test.pid", _start_session)
    if daemon.pid() is None:
        _start_session()
        daemon.owned = True
    (SESSION_HOME / "hvcpolicy").mkdir(exist_ok=True)
    user = pwd.getpwnam(SESSION_USER)
    os.chown(SESSION_HOME / "hvcpolicy", user.pw_uid, user.pw_gid)
    try:
        yield daemon
    finally:
        _undefine_all(SESSION_URI, "hvct-")
        if daemon.owned and (pid := daemon.pid()) is not None:
            stop_pid(pid, "libvirtd")
        # the session daemon spawned its own virtlogd
        logd = pid_from(SESSION_HOME / ".cache/libvirt/virtlogd.pid", "virtlogd")
        if daemon.owned and logd is not None:
            stop_pid(logd, "virtlogd")


def _undefine_all(uri: str, prefix: str) -> None:
    done = virsh(uri, "list", "--all", "--name", check=False, timeout=30)
    for name in done.stdout.split():
        if name.startswith(prefix):
            virsh(uri, "destroy", name, check=False, timeout=30)
            virsh(uri, "undefine", name, check=False, timeout=30)


# --- guests -------------------------------------------------------------------------------------


@dataclass
class Guest:
    name: str
    uri: str
    qemu_socket: str  # the real QEMU's second QMP socket
    sim_socket: str  # hvcpolicy simulate --upstream, what the hook talks to

    def state(self) -> str:
        return str(virsh(self.uri, "domstate", self.name, timeout=30).stdout.strip())

    def live_xml(self) -> str:
        return str(virsh(self.uri, "dumpxml", self.name, timeout=30).stdout)


def domain_xml(
    name: str,
    policy: str | None,
    qemu_socket: str,
    sim_socket: str,
    resume: bool = False,
    extra: str = "",
    bare: bool = False,
) -> str:
    meta = ""
    if policy is not None:
        meta = (
            f'<metadata><hvc:policy xmlns:hvc="{NS}" ref="{policy}">'
            f'<hvc:qmp socket="{sim_socket}"/>'
            + ('<hvc:resume after="apply"/>' if resume else "")
            + extra
            + "</hvc:policy></metadata>"
        )
    cmdline = (
        ""
        if bare
        else "<qemu:commandline><qemu:arg value='-qmp'/>"
        f"<qemu:arg value='unix:{qemu_socket},server=on,wait=off'/></qemu:commandline>"
    )
    return f"""<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  {meta}
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='aarch64' machine='virt'>hvm</type></os>
  <cpu mode='custom' match='exact'><model fallback='forbid'>cortex-a57</model></cpu>
  <devices><console type='pty'/></devices>
  {cmdline}
</domain>
"""


class Simulators:
    """Serve a guest's firmware-register interface: once the real QEMU's socket appears, run
    ``hvcpolicy simulate --upstream`` over it (as the daemon's user, so its hook can connect)."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab

    def watch(
        self, qemu_socket: str, sim_socket: str, kernel: str = SIM_KERNEL, session: bool = False
    ) -> threading.Thread:
        for path in (qemu_socket, sim_socket):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

        def launch() -> None:
            deadline = time.monotonic() + 120
            while not os.path.exists(qemu_socket):
                if time.monotonic() > deadline:
                    return
                time.sleep(0.01)
            cmd = ["--socket", sim_socket, "--kernel", kernel, "--upstream", qemu_socket]
            if session:
                user = pwd.getpwnam(SESSION_USER)
                proc = subprocess.Popen(
                    [HOOK_PYTHON, "-m", "hvcpolicy", "simulate", *cmd],
                    env={**_session_env(), "PYTHONPATH": str(self.lab.pkg)},
                    user=user.pw_uid,
                    group=user.pw_gid,
                    extra_groups=[],
                    cwd="/",
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            else:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "hvcpolicy", "simulate", *cmd],
                    env=self.lab.env(),
                    cwd="/",
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            self.lab.sims.append(proc)

        thread = threading.Thread(target=launch, daemon=True)
        thread.start()
        return thread


@pytest.fixture()
def guest_factory(lab: Lab, system_libvirtd: Daemon) -> Iterator[Callable[..., Guest]]:
    made: list[Guest] = []
    sims = Simulators(lab)

    def make(
        policy: str | None,
        resume: bool = False,
        extra: str = "",
        kernel: str = SIM_KERNEL,
        define: bool = True,
        bare: bool = False,
    ) -> Guest:
        name = f"hvct-{uuid.uuid4().hex[:8]}"
        g = Guest(
            name,
            SYSTEM_URI,
            f"{SYSTEM_QMP_DIR}/{name}.qmp",
            str(lab.root / "sim" / f"{name}.sock"),
        )
        xml = lab.root / f"{name}.xml"
        xml.write_text(
            domain_xml(name, policy, g.qemu_socket, g.sim_socket, resume, extra, bare=bare)
        )
        if define:
            virsh(SYSTEM_URI, "define", str(xml))
        sims.watch(g.qemu_socket, g.sim_socket, kernel)
        made.append(g)
        return g

    make.sims = sims  # type: ignore[attr-defined]
    yield make
    for g in made:
        virsh(g.uri, "destroy", g.name, check=False, timeout=30)
        virsh(g.uri, "undefine", g.name, check=False, timeout=30)
