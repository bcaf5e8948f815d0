"""Decision counters (hvcpolicy.counters): one byte per decision, the size is the count."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from hvcpolicy import counters
from hvcpolicy.hook.config import Config, parse_config
from tests.conftest import REPO


def test_each_decision_adds_one(tmp_path: Path) -> None:
    d = str(tmp_path / "counters")  # created on the first decision
    assert counters.read(d) == {}
    for _ in range(3):
        assert counters.count(d, "prepare", "refused")
    assert counters.count(d, "started/prelaunch", "applied")
    assert counters.read(d) == {("prepare", "refused"): 3, ("started/prelaunch", "applied"): 1}
    assert sorted(os.listdir(d)) == ["prepare,refused", "started:prelaunch,applied"]


def test_names_outside_the_vocabularies_are_refused_and_never_raise(tmp_path: Path) -> None:
    d = str(tmp_path)
    assert not counters.count(d, "../../etc/passwd", "refused")
    assert not counters.count(d, "prepare", "pwned\n")
    assert not counters.count(d, "started/../../x", "applied")
    assert not counters.count(None, "prepare", "allowed")
    assert os.listdir(d) == []
    # an unwritable place: not counted, no exception (the decision stands)
    (tmp_path / "file").write_text("")
    assert not counters.count(str(tmp_path / "file"), "prepare", "allowed")


def test_the_reader_ignores_what_it_did_not_write(tmp_path: Path) -> None:
    (tmp_path / "prepare,refused").write_bytes(b"..")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "prepare,bogus").write_text("x")
    (tmp_path / "started:prelaunch,applied").mkdir()
    os.symlink("/etc/passwd", tmp_path / "migrate,refused")
    assert counters.read(str(tmp_path)) == {("prepare", "refused"): 2}
    # and the hook does not write through a symlink planted at a counter's name
    assert not counters.count(str(tmp_path), "migrate", "refused")


def test_concurrent_decisions_are_all_counted(tmp_path: Path) -> None:
    d = str(tmp_path)
    code = (
        "import sys; from hvcpolicy import counters\n"
        "for _ in range(500): counters.count(sys.argv[1], 'migrate', 'refused')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", code, d], env=env) for _ in range(8)]
    assert all(p.wait(60) == 0 for p in procs)
    assert counters.read(d) == {("migrate", "refused"): 4000}


def test_the_hook_config_places_counters_beside_the_snapshot(tmp_path: Path) -> None:
    conf = Config(parse_config(f"host_snapshot = {tmp_path}/host.json\n", "c"), "c")
    assert conf.counters_dir == str(tmp_path / "counters")
    assert conf.counters_dir == counters.default_dir(f"{tmp_path}/host.json")
    conf = Config(parse_config("counters_dir = /srv/c\n", "c"), "c")
    assert conf.counters_dir == "/srv/c"


def _outcomes_in_sources() -> set[str]:
    """Every literal outcome passed to Hook.log / start's _audit, and every literal stage."""
    found: set[str] = set()
    for path in (REPO / "hvcpolicy").rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            args = node.args
            if name == "log" and args:
                candidates = [args[0]]
            elif name == "_audit" and len(args) >= 4:
                candidates = [args[3]]
            elif name == "_fail" and len(args) >= 3:
                candidates = [args[2]]
            else:
                continue
            for arg in candidates:
                values = [arg.body, arg.orelse] if isinstance(arg, ast.IfExp) else [arg]
                for v in values:
                    if isinstance(v, ast.IfExp):
                        values.extend([v.body, v.orelse])
                    elif isinstance(v, ast.Constant) and isinstance(v.value, str):
                        found.add(v.value)
    return found


def test_every_outcome_the_code_logs_can_be_counted() -> None:
    """A new outcome in an audit line must join counters.OUTCOMES, or it would go uncounted."""
    found = _outcomes_in_sources()
    assert {"allowed", "error", "recorded-resumed"} <= found  # the scan works
    assert found - counters.OUTCOMES == set()


def test_every_outcome_of_the_flow_can_be_counted() -> None:
    """The hook and ``start`` log the one flow's outcomes (``result.outcome``), which the
    literal scan above cannot see: its whole vocabulary must be countable."""
    from hvcpolicy import enforce

    assert "applied" in enforce.OUTCOMES and "unchanged" in enforce.OUTCOMES
    assert enforce.OUTCOMES <= counters.OUTCOMES


def test_every_outcome_of_a_stock_qemus_started_stage_can_be_counted() -> None:
    from hvcpolicy.hook import stock

    assert {stock.DEFERRED, stock.PAUSED_UNENFORCED, stock.PREDICTED} <= counters.OUTCOMES


def test_counting_is_cheap(tmp_path: Path) -> None:
    import time

    d = str(tmp_path)
    counters.count(d, "prepare", "allowed")
    start = time.perf_counter()
    for _ in range(1000):
        counters.count(d, "prepare", "allowed")
    per = (time.perf_counter() - start) / 1000
    assert per < 0.001, f"{per * 1e6:.0f} us per decision"


NS = "https://hvcpolicy.dev/xmlns/libvirt/1"


def test_the_hook_counts_each_decision_it_logs(tmp_path: Path) -> None:
    """The real hook entry (as libvirt execs it): every audit line is one count."""
    import json
    import shutil

    policies = tmp_path / "policies"
    policies.mkdir()
    for name, spec in {
        "open": {"unknown": "allow"},
        "future": {"features": {"0x6030000000160004:0": "require"}},
    }.items():
        doc = {"apiVersion": "hvcpolicy/v1", "kind": "FirmwarePolicy",
               "metadata": {"name": name}, "spec": spec}  # fmt: skip
        (policies / f"{name}.json").write_text(json.dumps(doc))
    shutil.copy(REPO / "examples" / "hosts" / "neoverse-n1_linux-6.18.json", tmp_path / "host.json")
    conf = tmp_path / "hook.conf"
    conf.write_text(
        f"policy_dir = {policies}\nhost_snapshot = {tmp_path / 'host.json'}\n"
        f"cache_dir = {tmp_path / 'cache'}\naudit_file = {tmp_path / 'audit.log'}\n"
    )
    conf.chmod(0o644)
    (tmp_path / "run.py").write_text(
        f"import sys\nsys.path.insert(0, {str(REPO)!r})\n"
        "from hvcpolicy.hook import config, entry\n"
        f"config.SYSTEM_CONF = {str(conf)!r}\n"
        "sys.exit(entry.main(sys.argv[1:], sys.stdin.buffer))\n"
    )

    def hook(stage: str, ref: str) -> int:
        xml = (
            f"<domain><name>g1</name><metadata><hvc:policy xmlns:hvc='{NS}' ref='{ref}'/>"
            "</metadata></domain>"
        )
        return subprocess.run(
            [sys.executable, "-I", "-S", str(tmp_path / "run.py"), "g1", stage, "begin", "-"],
            input=xml,
            env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"},
            capture_output=True,
            text=True,
            timeout=60,
        ).returncode

    assert hook("prepare", "open") == 0
    assert hook("prepare", "future") == 1
    assert hook("prepare", "future") == 1
    assert hook("migrate", "open") == 0
    lines = (tmp_path / "audit.log").read_text().splitlines()
    assert len(lines) == 4
    assert counters.read(str(tmp_path / "counters")) == {
        ("prepare", "allowed"): 1,
        ("prepare", "refused"): 2,
        ("migrate", "allowed"): 1,
    }
