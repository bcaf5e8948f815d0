"""Concurrency: 32 libvirt hooks at once, each for its own domain and its own simulated QEMU; and
many processes rewriting the host snapshot (as concurrent ``host probe`` refreshes do) while
others read it. Every hook result must be right for its own guest, and no reader may ever see a
torn snapshot file.

(``host probe`` itself needs arm64 KVM and exits 5 on this x86 machine, so the writers drive the
same atomic writer it uses, ``snapshot.save_snapshot``.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hvcpolicy.planner import plan_start
from hvcpolicy.policy import load_policy_file
from hvcpolicy.snapshot import load_snapshot
from tests.hardening.fuzzlib import Figures, record
from tests.hardening.simthread import REPO, hook_cmd, simulators
from tests.hardening.test_qmp_faults import domain_xml

HOOKS = 32
POLICY = REPO / "examples/policies/fleet-2026.yaml"
HOST = REPO / "examples/hosts/neoverse-n1_linux-6.18.json"


@pytest.fixture
def site() -> Iterator[Path]:
    base = Path(
        tempfile.mkdtemp(prefix="hvcpolicy-conc-", dir="/run" if os.geteuid() == 0 else None)
    )
    try:
        base.chmod(0o755)
        (base / "policies").mkdir(mode=0o755)
        (base / "policies/default.yaml").write_text(
            POLICY.read_text().replace("name: fleet-2026", "name: default")
        )
        shutil.copy(HOST, base / "host.json")
        # A generous bound: 32 Python processes start at once on 2 cores.
        (base / "hook.conf").write_text(
            f"policy_dir = {base}/policies\nhost_snapshot = {base}/host.json\n"
            f"cache_dir = {base}/cache\nqmp_timeout = 30\n"
        )
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_32_hooks_at_once_each_enforce_their_own_guest(site: Path) -> None:
    policy = load_policy_file(str(POLICY))
    # Half the guests 1 vCPU, half 3; half on a 6.18 host profile, half on 6.1: the results
    # differ per guest, so a mix-up between hooks would show.
    with (
        simulators(HOOKS // 2, kernel="6.18", vcpus=1) as a,
        simulators(HOOKS // 2, kernel="6.1", vcpus=3) as b,
    ):
        sims = a + b
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "HOME": "/root"}
        start = time.monotonic()
        procs = [
            subprocess.Popen(
                hook_cmd(str(site / "hook.conf"), f"dom{i}", "started", "begin", "-"),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd="/",
                env=env,
            )
            for i in range(HOOKS)
        ]
        results = []
        for i, proc in enumerate(procs):
            try:
                out, err = proc.communicate(domain_xml(f"dom{i}", sims[i].path), timeout=120)
            except subprocess.TimeoutExpired:
                for p in procs:
                    p.kill()
                raise
            results.append((proc.returncode, out, err))
        took = time.monotonic() - start
        for i, (rc, out, err) in enumerate(results):
            assert rc == 0, f"dom{i}: exit {rc}: {err!r}"
            assert out == b"" and err == b""
            sim = sims[i]
            expected = plan_start(policy, sim.fresh, sim.fresh).target
            for vcpu in range(sim.vm.vcpus):
                assert sim.vm.get_all(vcpu) == expected, f"dom{i} vCPU {vcpu}"
            assert sim.status == "prelaunch" and not sim.has_run
        # the two host kernels really give different answers
        assert sims[0].vm.get_all() != sims[-1].vm.get_all()
    record("concurrency/hooks", Figures(inputs=HOOKS, seconds=took))


WRITER = """
import sys
from hvcpolicy.snapshot import Snapshot, save_snapshot
path, me, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for j in range(rounds):
    regs = {0x6030000000160000 + k: (me * 1000 + j + k) & 0xffff for k in range(4)}
    # a large host name makes each file big enough that a torn write would show
    save_snapshot(Snapshot(host=f"w{me}-{j}" + "x" * 200, kernel="6.1.0", source="kvm",
                           registers=regs), path)
"""

READER = """
import json, sys, time
from hvcpolicy.snapshot import load_snapshot
path, seconds = sys.argv[1], float(sys.argv[2])
reads = bad = 0
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    try:
        snap = load_snapshot(path)
        me, j = snap.host.split("x", 1)[0][1:].split("-")
        assert snap.registers[0x6030000000160000] == (int(me) * 1000 + int(j)) & 0xffff
        reads += 1
    except Exception as err:
        bad += 1
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
print(json.dumps({"reads": reads, "bad": bad}))
"""


def test_concurrent_snapshot_refreshes_never_tear_the_file(tmp_path: Path) -> None:
    path = tmp_path / "host.json"
    subprocess.run(
        [sys.executable, "-c", WRITER, str(path), "99", "1"], check=True, cwd=REPO, timeout=60
    )
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(i), "60"],
            cwd=REPO,
            stderr=subprocess.PIPE,
        )
        for i in range(8)
    ]
    readers = [
        subprocess.Popen(
            [sys.executable, "-c", READER, str(path), "4"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(4)
    ]
    for w in writers:
        _, err = w.communicate(timeout=120)
        assert w.returncode == 0, err
    total = Figures()
    for r in readers:
        out, err = r.communicate(timeout=120)
        assert r.returncode == 0, err
        counts = json.loads(out)
        assert counts["bad"] == 0, err.decode()[:2000]
        assert counts["reads"] > 0
        total.inputs += counts["reads"]
    # the final file is one writer's last snapshot, whole; no temporary file is left behind
    final = load_snapshot(str(path))
    assert final.host.endswith("-59" + "x" * 200)
    assert sorted(os.listdir(tmp_path)) == ["host.json"]
    assert json.loads(path.read_text())["kind"] == "HostSnapshot"
    record("concurrency/snapshot-reads", total)
