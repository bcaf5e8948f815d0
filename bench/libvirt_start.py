"""``hvcpolicy start`` end to end against plain ``virsh start`` of the same TCG guest, on a real
libvirtd with the hook installed.

Run by run.py as a pytest module, so that it reuses the libvirt test harness as it is
(``tests/libvirt/conftest.py``: the system libvirtd started and stopped by pid, the hook installed
by ``hvcpolicy install-hook`` on a world-readable copy of the package, its config restored
afterwards). Two definitions of one TCG aarch64 guest, identical but for hvcpolicy's metadata:
``virsh start`` of the one without it is what starting this guest costs without hvcpolicy (the
hook's sh pre-filter still runs, as it does for every domain on a host that has it);
``hvcpolicy start`` of the one with it is a paused start, the hook's prelaunch apply over QMP,
the ``<hvc:applied>`` record and the resume. The QMP interface is served by
``hvcpolicy simulate``, started before each run (off the clock) as QEMU's own monitor would be
ready: QEMU itself lacks the interface. Each run is followed, off the clock, by ``virsh destroy``.

Environment: HVC_BENCH_REPS (rounds), HVC_BENCH_JSON (where the figures go), HVC_BENCH_PACKAGE
(a candidate tree whose hvcpolicy/ and hooks/ replace the harness's copy, the hook reinstalled from
it: to measure a change before it lands).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from common import Figure, median, write_figures  # noqa: E402

from tests.libvirt.conftest import (  # noqa: E402
    HOOK_PYTHON,
    HOOKS_DIR,
    SYSTEM_QMP_DIR,
    SYSTEM_URI,
    Lab,
    _copy_package,
    domain_xml,
    lab,  # noqa: F401  (a fixture)
    system_libvirtd,  # noqa: F401  (a fixture)
    virsh,
)

SIM_KERNEL = "6.18"


def _simulate(the_lab: Lab, sock: str) -> subprocess.Popen[bytes]:
    Path(sock).unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "hvcpolicy", "simulate", "--socket", sock, "--kernel", SIM_KERNEL],
        env=the_lab.env(), cwd="/", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not os.path.exists(sock):
        assert proc.poll() is None, "hvcpolicy simulate exited"
        assert time.monotonic() < deadline, "hvcpolicy simulate did not come up in 60 s"
        time.sleep(0.02)
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _console_script(the_lab: Lab) -> Path:
    """``hvcpolicy`` as a Debian host installs it: the launcher that Python packaging tools write
    for the ``[project.scripts]`` entry, on /usr/bin/python3 (the package on its path)."""
    import tomllib

    entry = tomllib.loads((HERE.parent / "pyproject.toml").read_text())["project"]["scripts"]
    module, func = entry["hvcpolicy"].split(":")
    path = the_lab.root / "bin" / "hvcpolicy"
    path.parent.mkdir(exist_ok=True)
    path.write_text(
        f"#!{HOOK_PYTHON}\n# -*- coding: utf-8 -*-\nimport re\nimport sys\n"
        f"from {module} import {func}\n"
        "if __name__ == '__main__':\n"
        "    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n"
        f"    sys.exit({func}())\n"
    )
    path.chmod(0o755)
    return path


def _use_candidate(the_lab: Lab, tree: Path) -> None:
    """Replace the harness's copy of the package with ``tree``'s and reinstall the hook from it
    (the config it wrote stays: install-hook keeps what it is not given)."""
    import shutil

    for sub in ("hvcpolicy", "hooks"):
        shutil.rmtree(the_lab.pkg / sub)
    real = Path(__file__).resolve().parents[1]
    try:
        import tests.libvirt.conftest as harness

        harness.REPO = tree  # _copy_package copies from the harness's REPO
        _copy_package(the_lab.pkg)
    finally:
        harness.REPO = real
    the_lab.hvcpolicy(
        "install-hook", "--python", HOOK_PYTHON, "--hooks-dir", HOOKS_DIR, "--no-reload"
    )


def test_hvcpolicy_start_vs_virsh_start(lab: Lab, system_libvirtd: object) -> None:  # noqa: F811
    reps = int(os.environ.get("HVC_BENCH_REPS", "8"))
    out = Path(os.environ.get("HVC_BENCH_JSON", str(HERE / "out" / "libvirt.json")))
    if os.environ.get("HVC_BENCH_PACKAGE"):
        _use_candidate(lab, Path(os.environ["HVC_BENCH_PACKAGE"]).resolve())
    tag = os.urandom(3).hex()
    managed, plain = f"hvct-bench-{tag}", f"hvct-bench-plain-{tag}"
    sim_sock = str(lab.root / "sim" / f"{managed}.sock")
    for name, policy in ((managed, "web"), (plain, None)):
        xml = lab.root / f"{name}.xml"
        xml.write_text(domain_xml(name, policy, f"{SYSTEM_QMP_DIR}/{name}.qmp", sim_sock))
        virsh(SYSTEM_URI, "define", str(xml))
    env = lab.env()
    hvc_cmd = [str(_console_script(lab)), "start", managed, "--connect", SYSTEM_URI]
    virsh_cmd = ["virsh", "-q", "-c", SYSTEM_URI, "start", plain]
    times: dict[str, list[float]] = {"hvcpolicy": [], "virsh": []}
    rng = random.Random(7)
    try:
        for rnd in range(reps + 1):  # round 0 warms up (QEMU's first start, page cache)
            order = ["hvcpolicy", "virsh"]
            rng.shuffle(order)
            for which in order:
                sim = _simulate(lab, sim_sock) if which == "hvcpolicy" else None
                try:
                    cmd, name = (hvc_cmd, managed) if which == "hvcpolicy" else (virsh_cmd, plain)
                    t0 = time.perf_counter()
                    done = subprocess.run(
                        cmd, env=env, cwd="/", capture_output=True, text=True, timeout=120
                    )
                    elapsed = time.perf_counter() - t0
                    assert done.returncode == 0, f"{cmd}: {done.returncode} {done.stderr}"
                    state = virsh(SYSTEM_URI, "domstate", name, timeout=30).stdout.strip()
                    assert state == "running", f"{name} is {state} after {which} start"
                    if which == "hvcpolicy":
                        assert "started under policy 'web'" in done.stdout, done.stdout
                    if rnd:
                        times[which].append(elapsed)
                finally:
                    virsh(SYSTEM_URI, "destroy", name, check=False, timeout=60)
                    if sim is not None:
                        _stop(sim)
        audit = [ln for ln in lab.audit() if f"domain={managed} " in ln]
        # start owns the start: one line of its own (the hook's stages step aside)
        assert any("stage=start " in ln and "outcome=applied" in ln for ln in audit)
    finally:
        for name in (managed, plain):
            virsh(SYSTEM_URI, "destroy", name, check=False, timeout=60)
            virsh(SYSTEM_URI, "undefine", name, check=False, timeout=60)
    ms = 1000.0
    fig = Figure(
        "hvcpolicy start (TCG guest, real libvirtd)", median(times["hvcpolicy"]) * ms, "ms",
        "virsh start (same guest, no hvcpolicy metadata)", median(times["virsh"]) * ms,
        1.5, "<= 1.5x",
    )  # fmt: skip
    write_figures(out, [fig], {"reps": reps, "timings": times})
