"""The hook without libvirt: ``hooks/qemu``'s shell pre-filter, and ``hvcpolicy/hook/`` stage by
stage, run the way libvirt runs them (a separate, isolated process; the XML on stdin) against
``hvcpolicy simulate``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hvcpolicy.errors import InvalidInput
from hvcpolicy.hook import config as hookconf
from hvcpolicy.hook import entry as hookmod
from hvcpolicy.simulator.harness import simulator_process

REPO = Path(__file__).resolve().parents[2]
NS = "https://hvcpolicy.dev/xmlns/libvirt/1"
LIBVIRT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/nonexistent", "LC_ALL": "C"}


def domain(ref: str | None, sock: str = "/nonexistent.sock", extra: str = "") -> str:
    meta = ""
    if ref is not None:
        meta = (
            f'  <metadata>\n    <hvc:policy xmlns:hvc="{NS}" ref="{ref}">\n'
            f'      <hvc:qmp socket="{sock}"/>\n{extra}    </hvc:policy>\n  </metadata>\n'
        )
    return (
        "<domain type='qemu' id='7'>\n  <name>g1</name>\n"
        "  <uuid>6a1f2c3d-0000-4000-8000-000000000002</uuid>\n"
        f"{meta}  <memory unit='KiB'>131072</memory>\n  <vcpu placement='static'>1</vcpu>\n"
        "  <devices><console type='pty'/></devices>\n</domain>\n"
    )


@pytest.fixture()
def env(tmp_path: Path) -> Path:
    """A hook config (policies, this host's snapshot, cache, audit file) under tmp_path."""
    policies = tmp_path / "policies"
    policies.mkdir()
    shutil.copy(REPO / "examples" / "policies" / "fleet-2026.yaml", policies)
    for name, spec in {
        "open": {"unknown": "allow"},
        "noptp": {"features": {"ptp": "deny"}, "unknown": "allow"},
        "future": {"features": {"0x6030000000160004:0": "require"}},
    }.items():
        doc = {"apiVersion": "hvcpolicy/v1", "kind": "FirmwarePolicy"}
        doc |= {"metadata": {"name": name}, "spec": spec}  # type: ignore[dict-item]
        (policies / f"{name}.json").write_text(json.dumps(doc))
    shutil.copy(REPO / "examples" / "hosts" / "neoverse-n1_linux-6.18.json", tmp_path / "host.json")
    (tmp_path / "hook.conf").write_text(
        f"policy_dir = {policies}\nhost_snapshot = {tmp_path / 'host.json'}\n"
        f"cache_dir = {tmp_path / 'cache'}\naudit_file = {tmp_path / 'audit.log'}\n"
        "qmp_timeout = 2\n"
    )
    (tmp_path / "hook.conf").chmod(0o644)
    # what libvirt would exec, with the config path pointed here
    (tmp_path / "run.py").write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "import hvcpolicy.hook.config as c, hvcpolicy.hook.entry as h\n"
        f"c.SYSTEM_CONF = {str(tmp_path / 'hook.conf')!r}\n"
        "sys.exit(h.main(sys.argv[1:], sys.stdin.buffer))\n"
    )
    return tmp_path


def run_hook(env: Path, stage: str, xml: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-I", "-S", str(env / "run.py"), "g1", stage, "begin", "-"],
        input=xml,
        env=LIBVIRT_ENV,
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
    )


def audit(env: Path) -> list[str]:
    path = env / "audit.log"
    return path.read_text().splitlines() if path.exists() else []


# --- hooks/qemu ---------------------------------------------------------------------------------


@pytest.fixture()
def sh_hook(tmp_path: Path) -> Path:
    """hooks/qemu with HVC_PYTHON replaced by a recorder of what it was given."""
    rec = tmp_path / "record.py"
    rec.write_text(
        "#!/bin/sh\n"
        f'printf "%s\\n" "$@" > {tmp_path}/argv\n'
        f'printf "%s" "$HVC_XML_HEAD" > {tmp_path}/head\n'
        f"cat > {tmp_path}/rest\n"
    )
    rec.chmod(0o755)
    text = (REPO / "hooks" / "qemu").read_text()
    text = text.replace("HVC_PYTHON=/usr/bin/python3", f"HVC_PYTHON={rec}")
    text = text.replace("HVC_POLICY_DIR=/etc/hvcpolicy/policies", f"HVC_POLICY_DIR={tmp_path}")
    script = tmp_path / "qemu"
    script.write_text(text)
    script.chmod(0o755)
    return script


def run_sh(script: Path, stage: str, xml: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(script), "g1", stage, "begin", "-"],
        input=xml,
        env=LIBVIRT_ENV,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize("stage", ["start", "stopped", "release", "attach", "bogus"])
def test_sh_ignores_stages_without_python(sh_hook: Path, stage: str) -> None:
    done = run_sh(sh_hook, stage, domain("fleet-2026"))
    assert done.returncode == 0
    assert not (sh_hook.parent / "argv").exists()


def test_sh_leaves_domains_without_metadata_alone(sh_hook: Path) -> None:
    done = run_sh(sh_hook, "prepare", domain(None))
    assert done.returncode == 0 and done.stdout == "" and done.stderr == ""
    assert not (sh_hook.parent / "argv").exists()


@pytest.mark.parametrize("stage", ["prepare", "started", "migrate", "restore", "reconnect"])
def test_sh_hands_python_the_whole_xml(sh_hook: Path, stage: str) -> None:
    xml = domain("fleet-2026")
    assert run_sh(sh_hook, stage, xml).returncode == 0
    d = sh_hook.parent
    argv = (d / "argv").read_text().splitlines()
    assert argv[:3] == ["-I", "-S", "-c"]
    assert "from hvcpolicy.hook.entry import main" in argv[3]
    assert argv[4:] == ["/usr/lib/python3/dist-packages", "g1", stage, "begin", "-"]
    head, rest = (d / "head").read_text(), (d / "rest").read_text()
    assert head and head + rest == xml  # the shell read only what it needed, byte-exact


def test_sh_with_a_default_policy_runs_python_for_every_domain(sh_hook: Path) -> None:
    (sh_hook.parent / "default.yaml").write_text("x")
    xml = domain(None)
    assert run_sh(sh_hook, "prepare", xml).returncode == 0
    assert (sh_hook.parent / "rest").read_text() == xml


# --- hook.py ------------------------------------------------------------------------------------


def test_prepare_allows_and_refuses_with_the_reason(env: Path) -> None:
    ok = run_hook(env, "prepare", domain("fleet-2026"))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == "" and ok.stderr == ""
    refused = run_hook(env, "prepare", domain("future"))
    assert refused.returncode == 1
    assert refused.stderr.startswith("hvcpolicy: domain 'g1' cannot start on this host")
    assert "requires 0x6030000000160004:0" in refused.stderr
    lines = audit(env)
    assert "stage=prepare policy=fleet-2026 outcome=allowed" in lines[0]
    assert "stage=prepare policy=future outcome=refused" in lines[1]
    assert "uuid=6a1f2c3d-0000-4000-8000-000000000002" in lines[1]


def test_domain_narrowing_that_widens_is_refused(env: Path) -> None:
    xml = domain("fleet-2026", extra='      <hvc:feature name="pv-time" mode="allow"/>\n')
    done = run_hook(env, "prepare", xml)
    assert done.returncode == 1 and "widens policy 'fleet-2026'" in done.stderr


def test_migrate_and_restore_print_nothing_and_judge_applied_values(env: Path) -> None:
    applied = (
        '      <hvc:applied host="src" kernel="6.18" at="2026-11-25T00:00:00Z">\n'
        '        <hvc:register id="0x6030000000160003" value="0x0"/>\n'
        "      </hvc:applied>\n"
    )
    for stage in ("migrate", "restore"):
        ok = run_hook(env, stage, domain("open", extra=applied))
        assert ok.returncode == 0 and ok.stdout == "", ok.stderr
    shutil.copy(REPO / "examples" / "hosts" / "neoverse-n1_linux-6.1.json", env / "host.json")
    refused = run_hook(env, "migrate", domain("open", extra=applied))
    assert refused.returncode == 1 and refused.stdout == ""
    assert "refuses an incoming migration" in refused.stderr
    assert "VENDOR_HYP_BMAP_2" in refused.stderr


def test_fast_stages_import_no_heavy_modules(env: Path) -> None:
    """prepare/migrate/restore: no argparse, yaml, jsonschema, asyncio or libvirt (the policy
    comes from the validated cache once it is warm)."""
    probe = env / "probe.py"
    probe.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "import hvcpolicy.hook.config as c, hvcpolicy.hook.entry as h\n"
        f"c.SYSTEM_CONF = {str(env / 'hook.conf')!r}\n"
        "rc = h.main(sys.argv[1:], sys.stdin.buffer)\n"
        "heavy = {'argparse', 'yaml', 'jsonschema', 'asyncio', 'libvirt', 'qemu', 'typing',\n"
        "         'dataclasses', 'site'}\n"
        "print(rc, sorted(heavy & set(sys.modules)))\n"
    )
    xml = domain("fleet-2026")
    assert run_hook(env, "prepare", xml).returncode == 0  # warms the cache
    for stage in ("prepare", "migrate", "restore"):
        done = subprocess.run(
            [sys.executable, "-I", "-S", str(probe), "g1", stage, "begin", "-"],
            input=xml,
            env=LIBVIRT_ENV,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.stdout.strip() == "0 []", (stage, done.stdout, done.stderr)


def test_started_prelaunch_applies_and_verifies(env: Path) -> None:
    sock = str(env / "qmp.sock")
    with simulator_process(sock, "6.18", "--vcpus", "4"):
        done = run_hook(env, "started", domain("noptp", sock))
        assert done.returncode == 0, done.stderr
        assert done.stdout == ""
    line = next(x for x in audit(env) if "stage=started/prelaunch" in x)
    assert "outcome=applied" in line
    assert "0x6030000000160002=0x3" in line.split(" after=")[0]  # before: ptp offered
    assert "0x6030000000160002=0x1" in line.split(" after=")[1]  # after: ptp denied


def test_started_running_refuses_with_the_fix_or_verifies(env: Path) -> None:
    sock = str(env / "qmp.sock")
    with simulator_process(sock, "6.18", "--runstate", "running"):
        refused = run_hook(env, "started", domain("noptp", sock))
        ok = run_hook(env, "started", domain("open", sock))
    assert refused.returncode == 1
    assert "already running" in refused.stderr
    assert "hvcpolicy start g1" in refused.stderr and "virsh start --paused g1" in refused.stderr
    assert ok.returncode == 0, ok.stderr


def test_started_without_the_interface_refuses_or_warns(env: Path) -> None:
    """A stock QEMU (no kvm-firmware-registers property): the stream backend reaches a guest
    that can be saved; one that cannot (a VFIO host device) follows unsupported-qemu."""
    sock = str(env / "qmp.sock")
    hostdev = domain("open", sock).replace(
        "<devices>", "<devices><hostdev mode='subsystem' type='pci'/>"
    )
    with simulator_process(sock, "6.18", "--fault", "no-interface"):
        refused = run_hook(env, "started", hostdev)
        paused = run_hook(env, "started", domain("noptp", sock))
        complies = run_hook(env, "started", domain("open", sock))
    assert refused.returncode == 1
    assert "no firmware-register interface and the guest cannot be saved" in refused.stderr
    assert "host device (VFIO)" in refused.stderr and "unsupported-qemu: refuse" in refused.stderr
    # prelaunch, no resume-after-apply: stays paused; the audit line says how to enforce
    assert paused.returncode == 0, paused.stderr
    line = [x for x in audit(env) if "outcome=paused-unenforced" in x]
    assert line and "stage=started/prelaunch" in line[0]
    assert "hvcpolicy start g1" in line[0] and "resume" in line[0]
    assert complies.returncode == 0, complies.stderr
    assert [x for x in audit(env) if "outcome=predicted" in x]


def test_started_qmp_wait_is_bounded(env: Path) -> None:
    import time

    t0 = time.monotonic()
    done = run_hook(env, "started", domain("open", str(env / "nobody-listens.sock")))
    assert time.monotonic() - t0 < 10  # qmp_timeout = 2 in the config
    assert done.returncode == 1
    assert "cannot connect" in done.stderr or "no answer within" in done.stderr


def test_reconnect_never_fails(env: Path) -> None:
    done = run_hook(env, "reconnect", domain("open", str(env / "nobody-listens.sock")))
    assert done.returncode == 0 and done.stderr == ""
    assert "stage=reconnect" in audit(env)[-1] and "outcome=error" in audit(env)[-1]


def test_config_others_can_write_is_not_trusted(env: Path) -> None:
    conf = env / "hook.conf"
    conf.chmod(0o666)
    with pytest.raises(InvalidInput, match="not trusted"):
        hookconf.load_config(str(conf))
    conf.chmod(0o644)
    assert hookconf.load_config(str(conf)).qmp_timeout == 2
    conf.write_text("bogus = 1\n")
    with pytest.raises(InvalidInput, match="line 1"):
        hookconf.load_config(str(conf))


def test_unmanaged_domain_is_left_alone_even_by_python(env: Path) -> None:
    for stage in ("prepare", "started", "migrate"):
        done = run_hook(env, stage, domain(None))
        assert done.returncode == 0 and done.stderr == ""
    assert not os.path.exists(env / "audit.log")


def test_started_rides_out_stray_replies_and_still_writes_the_right_values(env: Path) -> None:
    """Every QMP command carries its own id (qemu.qmp routes replies by it): a reply to nobody
    (another id) is skipped, not taken as the answer (it was a KeyError, an internal error, in
    the hook's own client before)."""
    sock = str(env / "qmp.sock")
    faults = ["--fault", "stray-reply@query-status", "--fault", "stray-reply@qom-get"]
    with simulator_process(sock, "6.18", "--vcpus", "2", *faults):
        done = run_hook(env, "started", domain("noptp", sock))
        assert done.returncode == 0, done.stderr
    line = next(x for x in audit(env) if "stage=started/prelaunch" in x)
    assert "outcome=applied" in line
    assert "0x6030000000160002=0x1" in line.split(" after=")[1]  # ptp denied, read back


def test_started_refuses_a_socket_others_could_have_planted(env: Path) -> None:
    """trust.check_qmp_socket before each connect: a socket in a directory others may write
    (here sticky, as /tmp is) is not QEMU's for sure; the hook fails closed."""
    shared = env / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    sock = str(shared / "qmp.sock")
    with simulator_process(sock, "6.18"):
        done = run_hook(env, "started", domain("open", sock))
    assert done.returncode == 1 and "writable by others" in done.stderr, done.stderr


def test_stdin_is_read_bounded(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hook reads at most 8 MiB + 1 of stdin, never all of it, and refuses beyond."""

    class Endless:
        asked: list[int] = []

        def read(self, n: int = -1) -> bytes:
            self.asked.append(n)
            assert 0 <= n <= (8 << 20) + 1, f"unbounded read({n})"
            return b" " * n

    monkeypatch.setattr(hookconf, "SYSTEM_CONF", str(env / "hook.conf"))
    stdin = Endless()
    assert hookmod.main(["g1", "prepare", "begin", "-"], stdin) == 1  # type: ignore[arg-type]
    assert stdin.asked == [(8 << 20) + 1]
    assert "larger than" in audit(env)[-1]


# --- the start lock (hvcpolicy/startlock.py): `hvcpolicy start` and the hook share one start ----


def _hold(path: Path, phase: str) -> int:
    """Hold ``path``'s flock as ``hvcpolicy start`` does, in ``phase`` (the caller closes)."""
    import fcntl

    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{phase}\n".encode(), 0)
    return fd


def _sh_with_run_dir(sh_hook: Path) -> Path:
    run = sh_hook.parent / "run"
    text = sh_hook.read_text().replace("HVC_RUN_DIR=/run/hvcpolicy", f"HVC_RUN_DIR={run}")
    sh_hook.write_text(text)
    return run / "start" / "g1"


# (phase, stage) -> whether the sh pre-filter steps aside (no Python): what start drives
STEPS_ASIDE = [
    ("start", "prepare", True),
    ("start", "started", True),
    ("start", "restore", False),  # no restore in a start
    ("restore", "restore", True),
    ("restore", "prepare", True),
    ("restore", "started", True),
    ("busy", "prepare", False),  # someone else's start between start's own steps
    ("busy", "started", False),
    ("busy", "restore", False),
    ("", "started", False),
    ("nonsense", "prepare", False),
]


@pytest.mark.parametrize(("phase", "stage", "aside"), STEPS_ASIDE)
def test_sh_steps_aside_only_for_what_a_held_start_lock_drives(
    sh_hook: Path, phase: str, stage: str, aside: bool
) -> None:
    from hvcpolicy import startlock

    lock = _sh_with_run_dir(sh_hook)
    fd = _hold(lock, phase)
    try:
        assert run_sh(sh_hook, stage, domain("fleet-2026")).returncode == 0
        assert (sh_hook.parent / "argv").exists() is not aside
        # the hook's Python makes the same test, for when it runs anyway
        run_dir = str(lock.parent.parent)
        assert startlock.steps_aside(run_dir, "g1", stage) is aside
    finally:
        os.close(fd)


def test_sh_runs_python_once_the_start_lock_died(sh_hook: Path) -> None:
    from hvcpolicy import startlock

    lock = _sh_with_run_dir(sh_hook)
    os.close(_hold(lock, "start"))  # a start that is gone left its file behind
    for stage in ("prepare", "started"):
        (sh_hook.parent / "argv").unlink(missing_ok=True)
        assert run_sh(sh_hook, stage, domain("fleet-2026")).returncode == 0
        assert (sh_hook.parent / "argv").exists()
        assert not startlock.steps_aside(str(lock.parent.parent), "g1", stage)


def test_sh_ignores_a_start_lock_it_does_not_own(sh_hook: Path) -> None:
    lock = _sh_with_run_dir(sh_hook)
    fd = _hold(lock, "start")
    try:
        os.chown(lock, 65534, -1)
        assert run_sh(sh_hook, "prepare", domain("fleet-2026")).returncode == 0
        assert (sh_hook.parent / "argv").exists()  # Python ran the stage
    finally:
        os.close(fd)


def _with_run_dir(env: Path) -> Path:
    conf = env / "hook.conf"
    conf.write_text(conf.read_text() + f"run_dir = {env / 'run'}\n")
    return env / "run" / "start" / "g1"


def test_python_hook_steps_aside_for_a_held_start_lock(env: Path) -> None:
    lock = _with_run_dir(env)
    fd = _hold(lock, "restore")
    try:
        # no QMP socket, no simulator: a stage that ran would fail; it steps aside
        done = run_hook(env, "started", domain("noptp", str(env / "nothing.sock")))
        assert done.returncode == 0, done.stderr
    finally:
        os.close(fd)
    assert not [x for x in audit(env) if "stage=started" in x]
    done = run_hook(env, "started", domain("noptp", str(env / "nothing.sock")))
    assert done.returncode == 1  # the lock died: the stage runs (and fails, no QMP here)


def _recorder_lines(env: Path) -> list[str]:
    return [x for x in audit(env) if "stage=started/recorder" in x]


def test_started_forks_its_recorder_when_no_start_holds_the_lock(env: Path) -> None:
    import time

    lock = _with_run_dir(env)
    sock = str(env / "qmp.sock")
    os.close(_hold(lock, "start"))  # a start that is gone left its file behind
    with simulator_process(sock, "6.18", "--vcpus", "2"):
        assert run_hook(env, "started", domain("noptp", sock)).returncode == 0
    deadline = time.monotonic() + 30
    while not _recorder_lines(env) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _recorder_lines(env), audit(env)  # no libvirtd here: it logs record-failed
