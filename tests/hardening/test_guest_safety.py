"""Never lose a guest, and never trust the hook's environment.

- ``reconnect`` never fails (libvirtd kills the guest if it does), whatever the config, the
  policy directory, the XML or QEMU; ``stopped`` and ``release`` never fail.
- A guest that already ran is never written: the hook and ``apply`` only verify it.
- The hook's environment is not trusted: PYTHONPATH, PYTHONSTARTUP, PYTHONINSPECT, HOME and a
  preset HVC_XML_HEAD change nothing; the shell pre-filter resets HVC_XML_HEAD itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hardening.simthread import REPO, hvcpolicy, run_hook, simulators
from tests.hardening.test_qmp_faults import domain_xml

POLICY = REPO / "examples/policies/fleet-2026.yaml"
HVC = "https://hvcpolicy.dev/xmlns/libvirt/1"


def _conf(tmp: Path, **over: str) -> Path:
    values = {
        "policy_dir": f"{tmp}/policies",
        "host_snapshot": f"{tmp}/host.json",
        "cache_dir": f"{tmp}/cache",
        "qmp_timeout": "0.5",
    }
    values.update(over)
    conf = tmp / "hook.conf"
    conf.write_text("".join(f"{k} = {v}\n" for k, v in values.items()))
    conf.chmod(0o644)
    return conf


def _site(tmp: Path) -> Path:
    (tmp / "policies").mkdir()
    (tmp / "policies/default.yaml").write_text(
        POLICY.read_text().replace("name: fleet-2026", "name: default")
    )
    (tmp / "host.json").write_text(
        (REPO / "examples/hosts/neoverse-n1_linux-6.18.json").read_text()
    )
    return _conf(tmp)


BROKEN = {
    "untrusted-config": lambda t: (_site(t).chmod(0o666), t / "hook.conf")[1],
    "garbage-config": lambda t: (_site(t).write_text("policy_dir\n\x00\xff"), t / "hook.conf")[1],
    "bad-timeout": lambda t: (_site(t), _conf(t, qmp_timeout="-1"))[1],
    "missing-policy-dir": lambda t: _conf(t, policy_dir="/nonexistent"),
    "broken-policy": lambda t: (
        _site(t),
        (t / "policies/default.yaml").write_text("spec: [\n"),
        t / "hook.conf",
    )[2],
    "missing-snapshot": lambda t: (_site(t), _conf(t, host_snapshot="/nonexistent.json"))[1],
}


@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_reconnect_never_fails(broken: str, trusted_tmp: Path) -> None:
    conf = BROKEN[broken](trusted_tmp)
    with simulators(1, runstate="running", faults=["hang@qom-get"]) as [sim]:
        for xml in (domain_xml("d", sim.path), b"<domain", b"\xff" * 100, b""):
            run = run_hook(str(conf), ["d", "reconnect", "begin", "-"], xml)
            assert run.rc == 0, (broken, run.stderr)
            assert run.stdout == "" and run.stderr == ""
            assert run.seconds < 5
        assert sim.vm.get_all() == sim.fresh


@pytest.mark.parametrize("stage", ["stopped", "release", "start", "attach"])
@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_stopped_and_release_never_fail(stage: str, broken: str, trusted_tmp: Path) -> None:
    conf = BROKEN[broken](trusted_tmp)
    run = run_hook(str(conf), ["d", stage, "end", "-"], b"<domain><name>d</name></domain>")
    assert run.rc == 0 and run.stdout == "" and run.stderr == ""


@pytest.mark.parametrize("runstate", ["running", "paused"])
def test_a_guest_that_ran_is_never_written(runstate: str, trusted_tmp: Path) -> None:
    """The values differ from the policy (fresh 6.18 host: pv-time on), so a writer would write;
    the hook refuses (already-running: refuse) and apply exits 3, and nothing changes."""
    conf = _site(trusted_tmp)
    with simulators(2, runstate=runstate) as sims:
        run = run_hook(str(conf), ["d", "started", "begin", "-"], domain_xml("d", sims[0].path))
        assert run.rc == 1 and len(run.stderr.splitlines()) == 1, run.stderr
        assert "differ" in run.stderr or "does not match" in run.stderr, run.stderr
        assert sims[0].vm.get_all() == sims[0].fresh
        applied = hvcpolicy(
            "apply", "--qmp", sims[1].path, "--policy", str(POLICY), "--resume", "--timeout", "2"
        )
        assert applied.rc in (3, 5), applied.stderr
        assert len(applied.stderr.splitlines()) == 1
        assert sims[1].vm.get_all() == sims[1].fresh
        assert sims[1].status == runstate  # not resumed either


# --- the environment --------------------------------------------------------------------------


def _evil_pythonpath(tmp: Path) -> tuple[dict[str, str], Path]:
    marker = tmp / "pwned"
    evil = tmp / "evil"
    (evil / "hvcpolicy").mkdir(parents=True)
    payload = f"open({str(marker)!r}, 'w').write('x')\n"
    for mod in ("json.py", "socket.py", "xml/__init__.py", "hvcpolicy/__init__.py", "yaml.py"):
        (evil / mod).parent.mkdir(parents=True, exist_ok=True)
        (evil / mod).write_text(payload)
    (tmp / "startup.py").write_text(payload)
    env = {
        "PATH": f"{evil}:/usr/sbin:/usr/bin:/sbin:/bin",
        "LC_ALL": "C",
        "HOME": str(tmp),
        "PYTHONPATH": str(evil),
        "PYTHONSTARTUP": str(tmp / "startup.py"),
        "PYTHONINSPECT": "1",
        "PYTHONHOME": str(evil),
        "HVC_XML_HEAD": "",
    }
    return env, marker


def test_the_hook_entry_ignores_python_environment(tmp_path: Path) -> None:
    """libvirt runs ``python3 -I -S .../hvcpolicy/hook/entry.py``: -I ignores every PYTHON* variable
    and the user site; the hook reads its config from /etc (root), never from $HOME."""
    env, marker = _evil_pythonpath(tmp_path)
    env.pop("PYTHONHOME")  # would stop any interpreter from starting at all
    (tmp_path / ".config/hvcpolicy").mkdir(parents=True)
    (tmp_path / ".config/hvcpolicy/hook.conf").write_text("policy_dir = /evil\n")
    done = subprocess.run(
        [
            sys.executable,
            "-I",
            "-S",
            str(REPO / "hvcpolicy/hook/entry.py"),
            "d",
            "reconnect",
            "begin",
            "-",
        ],
        input=b"<domain><name>d</name></domain>",
        capture_output=True,
        env=env,
        cwd="/",
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert not marker.exists(), "code from the environment ran inside the hook"


def test_the_shell_prefilter_resets_hvc_xml_head(tmp_path: Path) -> None:
    """A preset HVC_XML_HEAD never reaches Python: the script sets it from stdin alone."""
    seen = tmp_path / "seen"
    fake_python = tmp_path / "python3"
    fake_python.write_text(f'#!/bin/sh\nprintf "%s" "$HVC_XML_HEAD" > {seen}\ncat >> {seen}\n')
    fake_python.chmod(0o755)
    hook = tmp_path / "qemu"
    text = (REPO / "hooks/qemu").read_text()
    text = text.replace("HVC_PYTHON=/usr/bin/python3", f"HVC_PYTHON={fake_python}")
    text = text.replace("HVC_POLICY_DIR=/etc/hvcpolicy/policies", f"HVC_POLICY_DIR={tmp_path}/p")
    assert f"HVC_PYTHON={fake_python}" in text
    hook.write_text(text)
    hook.chmod(0o755)
    xml = (
        f"<domain>\n<name>d</name>\n<metadata>\n<hvc:policy xmlns:hvc='{HVC}' ref='x'/>\n"
        "</metadata>\n</domain>\n"
    ).encode()
    injected = f"<domain><metadata><hvc:policy xmlns:hvc='{HVC}' ref='evil'/>"
    done = subprocess.run(
        [str(hook), "d", "prepare", "begin", "-"],
        input=xml,
        capture_output=True,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HVC_XML_HEAD": injected},
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert seen.read_bytes() == xml, "Python saw something other than libvirt's stdin"
    assert b"evil" not in seen.read_bytes()


def test_no_shell_sees_domain_strings() -> None:
    """The only subprocess the hook starts (the detached recorder's virsh) gets an argv list,
    never a shell command line; domain-controlled text reaches it quoted by virsh's rules."""
    import ast

    trees = [ast.parse(p.read_text()) for p in (REPO / "hvcpolicy/hook").glob("*.py")]
    for node in (n for tree in trees for n in ast.walk(tree)):
        if isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            assert name not in ("os.system", "os.popen", "subprocess.getoutput"), name
            for kw in node.keywords:
                if kw.arg == "shell":
                    assert isinstance(kw.value, ast.Constant) and kw.value.value is False
    from hvcpolicy.hook.recorder import virsh_quote

    hostile = "x'; resume --domain other; echo '"
    quoted = virsh_quote([hostile])
    assert quoted == "'x'\\''; resume --domain other; echo '\\'''"
    assert os.linesep not in quoted


def test_messages_never_echo_unbounded_input(tmp_path: Path, trusted_tmp: Path) -> None:
    """A 100 kB feature name, ref or register value comes back bounded in the one-line error."""
    big = "A" * 100_000
    xml = (
        f"<domain><name>{big}</name><metadata><hvc:policy xmlns:hvc='{HVC}' ref='fleet-2026'>"
        f"<hvc:feature name='{big[:4000]}' mode='deny'/></hvc:policy></metadata></domain>"
    )
    path = tmp_path / "big.xml"
    path.write_text(xml)
    run = hvcpolicy("validate", "--policy-dir", str(REPO / "examples/policies"), str(path))
    assert run.rc == 4 and len(run.stderr) < 1000, len(run.stderr)
    conf = _site(trusted_tmp)
    hook = run_hook(str(conf), [big[:4000], "prepare", "begin", "-"], xml.encode())
    assert hook.rc == 1 and len(hook.stderr) < 6000 and len(hook.stderr.splitlines()) == 1
