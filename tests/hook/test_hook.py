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
from typing import Any

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
    sock = str(env / "qmp.sock")
    with simulator_process(sock, "6.18", "--fault", "no-interface"):
        refused = run_hook(env, "started", domain("open", sock))
    assert refused.returncode == 1 and "no kvm-firmware-registers property" in refused.stderr


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
    """Every HookQMP command carries its own id: a reply to nobody (another id) is skipped, not
    taken as the answer (it was a KeyError, an internal error, before)."""
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


def _hold(path: Path) -> int:
    """Hold ``path``'s flock as ``hvcpolicy start`` does (the caller closes the fd)."""
    import fcntl

    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_sh_prepare_leaves_a_held_start_lock_to_start(sh_hook: Path) -> None:
    text = sh_hook.read_text().replace(
        "HVC_RUN_DIR=/run/hvcpolicy", f"HVC_RUN_DIR={sh_hook.parent / 'run'}"
    )
    sh_hook.write_text(text)
    lock = sh_hook.parent / "run" / "start" / "g1"
    fd = _hold(lock)
    try:
        assert run_sh(sh_hook, "prepare", domain("fleet-2026")).returncode == 0
        assert not (sh_hook.parent / "argv").exists()  # start checked: no Python
        assert run_sh(sh_hook, "started", domain("fleet-2026")).returncode == 0
        assert (sh_hook.parent / "argv").exists()  # started always enforces
    finally:
        os.close(fd)
    (sh_hook.parent / "argv").unlink()
    # the lock died with its holder: prepare checks again
    assert run_sh(sh_hook, "prepare", domain("fleet-2026")).returncode == 0
    assert (sh_hook.parent / "argv").exists()


def _with_run_dir(env: Path) -> Path:
    conf = env / "hook.conf"
    conf.write_text(conf.read_text() + f"run_dir = {env / 'run'}\n")
    return env / "run" / "start" / "g1"


def _recorder_lines(env: Path) -> list[str]:
    return [x for x in audit(env) if "stage=started/recorder" in x]


def test_started_hands_what_it_applied_to_a_start_holding_the_lock(env: Path) -> None:
    import time

    lock = _with_run_dir(env)
    sock = str(env / "qmp.sock")
    fd = _hold(lock)
    try:
        with simulator_process(sock, "6.18", "--vcpus", "2"):
            done = run_hook(env, "started", domain("noptp", sock))
            assert done.returncode == 0, done.stderr
        handed = json.loads(os.pread(fd, 1 << 20, 0))
    finally:
        os.close(fd)
    assert handed["before"][str(0x6030000000160002)] == 0x3  # ptp offered by the kernel
    assert handed["after"][str(0x6030000000160002)] == 0x1  # ptp denied, as written
    assert handed["element"].startswith("<hvc:policy ") and "<hvc:applied " in handed["element"]
    time.sleep(1.5)  # a recorder, had one been forked, logs within this (see the test below)
    assert _recorder_lines(env) == []


def test_started_forks_its_recorder_when_no_start_holds_the_lock(env: Path) -> None:
    import time

    lock = _with_run_dir(env)
    sock = str(env / "qmp.sock")
    os.close(_hold(lock))  # a start that is gone left its file behind
    with simulator_process(sock, "6.18", "--vcpus", "2"):
        assert run_hook(env, "started", domain("noptp", sock)).returncode == 0
    deadline = time.monotonic() + 30
    while not _recorder_lines(env) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _recorder_lines(env), audit(env)  # no libvirtd here: it logs record-failed
    assert lock.read_bytes() == b""  # and nothing was handed to the dead start


# --- `started` served by `hvcpolicy start` (StartLock.serve): the sh pre-filter's call ---------


def _sh_with_run_dir(sh_hook: Path, wait: int | None = None) -> str:
    run = sh_hook.parent / "run"
    text = sh_hook.read_text().replace("HVC_RUN_DIR=/run/hvcpolicy", f"HVC_RUN_DIR={run}")
    if wait is not None:
        text = text.replace("-w 120", f"-w {wait}")
    sh_hook.write_text(text)
    return str(run)


def test_sh_started_is_answered_by_the_start_holding_the_lock(sh_hook: Path) -> None:
    from hvcpolicy.startlock import StartLock

    run = _sh_with_run_dir(sh_hook)
    xml = domain("fleet-2026") + "<!--" + "x" * 200_000 + "-->\n"  # more than a pipe holds
    got: list[bytes] = []

    def handler(stdin: Any) -> tuple[int, str]:
        got.append(stdin.read())
        return 0, ""

    with StartLock.acquire(run, "g1") as lock:  # type: ignore[union-attr]
        assert lock.serve(handler)
        done = run_sh(sh_hook, "started", xml)
        assert done.returncode == 0 and done.stderr == "", done.stderr
        assert got == [xml.encode()]  # the hook's own stdin, whole
        assert not (sh_hook.parent / "argv").exists()  # no Python
        # served once: a second call is not answered, and Python runs
        assert run_sh(sh_hook, "started", xml).returncode == 0
        assert (sh_hook.parent / "argv").exists()
        d = sh_hook.parent
        assert (d / "head").read_text() + (d / "rest").read_text() == xml
    for sub in ("start", "call", "answer"):
        assert os.listdir(os.path.join(run, sub)) == []  # everything removed on release


@pytest.mark.parametrize(
    ("answer", "rc", "stderr"),
    [
        ((1, "hvcpolicy: domain 'g1' refused: no"), 1, "hvcpolicy: domain 'g1' refused: no\n"),
        (RuntimeError("boom"), 1, "internal error in `hvcpolicy start`: RuntimeError('boom')"),
    ],
)
def test_sh_started_says_what_start_answered(
    sh_hook: Path, answer: object, rc: int, stderr: str
) -> None:
    from hvcpolicy.startlock import StartLock

    run = _sh_with_run_dir(sh_hook)

    def handler(stdin: Any) -> tuple[int, str]:
        stdin.read()
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[return-value]

    with StartLock.acquire(run, "g1") as lock:  # type: ignore[union-attr]
        assert lock.serve(handler)
        done = run_sh(sh_hook, "started", domain("fleet-2026"))
    assert (done.returncode, stderr in done.stderr) == (rc, True), done.stderr
    assert not (sh_hook.parent / "argv").exists()  # the XML is consumed: refused, not retried


def test_sh_started_runs_python_when_no_start_answers(sh_hook: Path) -> None:
    run = _sh_with_run_dir(sh_hook)
    # what a start killed after answering an earlier call leaves: its FIFO and its answer, with
    # no lock held (the kernel dropped them with it)
    os.makedirs(f"{run}/call", mode=0o700)
    os.makedirs(f"{run}/answer", mode=0o700)
    os.mkfifo(f"{run}/call/g1", 0o600)
    Path(f"{run}/answer/g1").write_text("00000000-0000-0000-0000-000000000000 0\n")
    xml = domain("fleet-2026")
    done = run_sh(sh_hook, "started", xml)
    assert done.returncode == 0, done.stderr
    d = sh_hook.parent
    assert (d / "head").read_text() + (d / "rest").read_text() == xml  # Python got it all


def test_sh_started_refuses_when_start_never_answers(sh_hook: Path) -> None:
    import fcntl

    run = _sh_with_run_dir(sh_hook, wait=1)
    os.makedirs(f"{run}/call", mode=0o700)
    os.makedirs(f"{run}/answer", mode=0o700)
    os.mkfifo(f"{run}/call/g1", 0o600)
    fd = os.open(f"{run}/answer/g1", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a start that is alive and stuck
    try:
        done = run_sh(sh_hook, "started", domain("fleet-2026"))
    finally:
        os.close(fd)
    assert done.returncode == 1
    assert "did not answer the started stage" in done.stderr
    assert not (sh_hook.parent / "argv").exists()  # it may still be writing: no second writer


def test_start_serves_the_hooks_own_stage(env: Path) -> None:
    """``hook.serve`` in start's process: the same stage, its audit line says so, the hand-over
    reaches the lock, and nothing is forked."""
    import io

    from hvcpolicy.startlock import StartLock

    lock_file = _with_run_dir(env)
    sock = str(env / "qmp.sock")
    conf = hookconf.load_config(str(env / "hook.conf"))
    xml = domain("noptp", sock).encode()
    with StartLock.acquire(str(lock_file.parent.parent), "g1") as lock:  # type: ignore[union-attr]
        with simulator_process(sock, "6.18", "--vcpus", "2"):
            rc, message = hookmod.serve(["g1", "started", "begin", "-"], io.BytesIO(xml), conf)
        assert (rc, message) == (0, "")
        handed = lock.handed_over()
    assert handed is not None and handed.after[0x6030000000160002] == 0x1
    applied = [x for x in audit(env) if "stage=started/prelaunch" in x]
    assert len(applied) == 1 and "outcome=applied" in applied[0] and "by=start" in applied[0]
    # the lock gone (start lost it): refused, never a recorder forked from start's process
    with simulator_process(sock, "6.18", "--vcpus", "2"):
        rc, message = hookmod.serve(["g1", "started", "begin", "-"], io.BytesIO(xml), conf)
    assert rc == 1 and "the start lock was lost" in message
    assert _recorder_lines(env) == []


def test_serving_needs_a_place_only_this_user_can_write(tmp_path: Path) -> None:
    from hvcpolicy.startlock import StartLock

    run = tmp_path / "run"
    with StartLock.acquire(str(run), "g1") as lock:  # type: ignore[union-attr]
        (run / "answer").mkdir(mode=0o700)
        os.chmod(run / "answer", 0o777)
        assert not lock.serve(lambda stdin: (0, ""))
        assert lock.server is None


@pytest.mark.parametrize("foreign", ["call/g1", "answer/g1", "answer", "."])
def test_sh_started_takes_no_answer_from_files_it_does_not_own(sh_hook: Path, foreign: str) -> None:
    from hvcpolicy.startlock import StartLock

    run = _sh_with_run_dir(sh_hook)
    served: list[int] = []
    with StartLock.acquire(run, "g1") as lock:  # type: ignore[union-attr]
        assert lock.serve(lambda stdin: (served.append(1), (0, ""))[1])
        os.chown(os.path.join(run, foreign), 65534, -1, follow_symlinks=False)
        done = run_sh(sh_hook, "started", domain("fleet-2026"))
    assert done.returncode == 0 and served == []
    assert (sh_hook.parent / "argv").exists()  # Python ran the stage
