"""Fuzz the commands on fuzzed files, and the hook on fuzzed argv and stdin.

- ``validate``, ``explain`` and ``check-migration`` on mutated policies, snapshots and domain XML:
  in-process through ``cli.main.main`` (the bulk), and through real ``python -m hvcpolicy``
  processes (fewer): the exit code is one of 0, 3, 4; stderr has no traceback and every line is
  an ``hvcpolicy:`` line (one line, except validate's one line per problem).
- the hook entry ``hvcpolicy.hook.entry.main`` on fuzzed argv (stage names, extra words, huge and
  binary arguments) and fuzzed domain XML on stdin: it returns 0 or 1 (what libvirt reads),
  writes at most one stderr line, nothing on stdout for migrate/restore, and never raises.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hvcpolicy.errors import InvalidInput
from tests.hardening import targets
from tests.hardening.fuzzlib import (
    Figures,
    assert_clean,
    mutated,
    run_inputs,
    tree_inputs,
    xml_inputs,
)
from tests.hardening.simthread import REPO
from tests.hardening.test_fuzz_parsers import POLICY_KEYS, SNAPSHOT_KEYS

HOST = str(REPO / "examples/hosts/neoverse-n1_linux-6.18.json")
POLICY = str(REPO / "examples/policies/fleet-2026.yaml")
POLICY_DIR = str(REPO / "examples/policies")


class BadOutput(Exception):
    """The command broke the output contract (exit code, traceback, stderr shape)."""


def _main(argv: list[str]) -> tuple[int, str, str]:
    from hvcpolicy.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse
            rc = int(exc.code or 0)
    return rc, out.getvalue(), err.getvalue()


def _check(argv: list[str], rc: int, err: str, one_line: bool) -> None:
    if rc not in (0, 3, 4):
        raise BadOutput(f"{argv}: exit {rc}: {err[:500]!r}")
    if "Traceback" in err or "internal error" in err:
        raise BadOutput(f"{argv}: {err[:2000]}")
    lines = err.splitlines()
    if any(not line.startswith("hvcpolicy: ") for line in lines):
        raise BadOutput(f"{argv}: stray stderr {err[:500]!r}")
    if one_line and len(lines) > 1:
        raise BadOutput(f"{argv}: {len(lines)} stderr lines: {err[:500]!r}")


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="hvcpolicy-clifuzz-"))
    try:
        yield d
    finally:
        shutil.rmtree(d)


def _commands(kind: str, path: str) -> list[tuple[list[str], bool]]:
    if kind == "policy":
        return [
            (["validate", path], False),
            (["explain", "--policy", path, "--host", HOST], True),
            (["check-migration", "--policy", path, "--to", HOST, "--from", HOST], True),
        ]
    if kind == "snapshot":
        return [
            (["validate", path], False),
            (["explain", "--policy", POLICY, "--host", path], True),
            (["check-migration", "--policy", POLICY, "--to", path], True),
            (["baseline", path, HOST], True),
        ]
    return [
        (["validate", "--policy-dir", POLICY_DIR, path], False),
        (["explain", "--policy-dir", POLICY_DIR, "--domain-xml", path, "--host", HOST], True),
        (["check-migration", "--policy-dir", POLICY_DIR, "--domain-xml", path, "--to", HOST], True),
    ]


def _inputs(kind: str, count: int) -> Iterator[bytes]:
    half = count // 2
    if kind == "policy":
        yield from mutated("policy", targets.POLICY_TOKENS, half, 11)
        yield from tree_inputs("policy", POLICY_KEYS, count - half, 12)
    elif kind == "snapshot":
        yield from mutated("snapshot", targets.SNAPSHOT_TOKENS, half, 13)
        yield from tree_inputs("snapshot", SNAPSHOT_KEYS, count - half, 14)
    else:
        yield from mutated("xml", targets.XML_TOKENS, half, 15)
        yield from xml_inputs(count - half, 16)


EXT = {"policy": "fleet-2026.yaml", "snapshot": "host.json", "xml": "dom.xml"}
COUNTS = {"policy": 700, "snapshot": 700, "xml": 900}


@pytest.mark.parametrize("kind", sorted(COUNTS))
def test_cli_in_process(kind: str, workdir: Path) -> None:
    path = workdir / EXT[kind]

    def target(data: bytes) -> None:
        path.write_bytes(data)
        for argv, one_line in _commands(kind, str(path)):
            rc, _, err = _main(argv)
            _check(argv, rc, err, one_line)

    fig = run_inputs(_inputs(kind, COUNTS[kind]), target, ())
    assert fig.inputs == COUNTS[kind]
    assert_clean(f"cli/in-process-{kind}", fig)


def test_cli_processes(workdir: Path) -> None:
    """The same contract through real processes: validate on 120 fuzzed files per process, and
    explain/check-migration one process each."""
    fig = Figures()
    for kind in sorted(COUNTS):
        sub = workdir / f"proc-{kind}"
        sub.mkdir(exist_ok=True)
        paths = []
        for i, data in enumerate(_inputs(kind, 120)):
            stem = "fleet-2026" if kind == "policy" else f"f{i}"
            ext = {"policy": ".yaml", "snapshot": ".json", "xml": ".xml"}[kind]
            d = sub / str(i)
            d.mkdir(exist_ok=True)
            (d / f"{stem}{ext}").write_bytes(data)
            paths.append(str(d / f"{stem}{ext}"))
        runs = [
            (["validate", *(["--policy-dir", POLICY_DIR] if kind == "xml" else []), *paths], False)
        ]
        for p in paths[:8]:
            runs.extend((argv, one) for argv, one in _commands(kind, p) if argv[0] != "validate")
        for argv, one_line in runs:
            done = subprocess.run(
                [sys.executable, "-m", "hvcpolicy", *argv],
                capture_output=True,
                text=True,
                timeout=120,
                cwd=REPO,
                check=False,
            )
            fig.inputs += len(paths) if argv[0] == "validate" else 1
            try:
                _check(argv[:3], done.returncode, done.stderr, one_line)
            except BadOutput as err:
                fig.tracebacks += 1
                fig.examples.append(str(err))
    assert_clean("cli/processes", fig)


# --- the hook's argv and stdin ----------------------------------------------------------------

STAGES = ["prepare", "started", "migrate", "restore", "reconnect"] * 4
STAGES += ["start", "stopped", "release"]
STAGES += ["attach", "", "PREPARE", "started\x00", "-", "x" * 10000]
SUBOPS = ["begin", "end", "-", "", "\udcff", "--help", "-v"]


def _argv(rng: random.Random) -> list[str]:
    words = [rng.choice(["web1", "", "-v", "--help", "x" * 5000, "\udcff\udcfe", "a b", "../x"])]
    words.append(rng.choice(STAGES))
    words += [rng.choice(SUBOPS) for _ in range(rng.choice((0, 1, 2, 2, 2, 5)))]
    return words[: rng.choice((0, 1, 2, 3, 4, 4, 4, 4, 4, 4, 4, 7))]


@pytest.fixture(scope="module")
def hook_conf() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="hvcpolicy-hookfuzz-")
    try:
        os.mkdir(f"{d}/policies")
        shutil.copy(POLICY, f"{d}/policies/fleet-2026.yaml")
        shutil.copy(HOST, f"{d}/host.json")
        with open(f"{d}/hook.conf", "w") as f:
            f.write(
                f"policy_dir = {d}/policies\nhost_snapshot = {d}/host.json\n"
                f"cache_dir = {d}/cache\nqmp_timeout = 0.05\n"
            )
        yield f"{d}/hook.conf"
    finally:
        shutil.rmtree(d)


def test_hook_argv_and_stdin(hook_conf: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from hvcpolicy.hook import config, entry

    monkeypatch.setattr(config, "SYSTEM_CONF", hook_conf)
    monkeypatch.delenv("HVC_XML_HEAD", raising=False)
    rng = random.Random(5)
    xmls = list(xml_inputs(2000, 17)) + list(mutated("xml", targets.XML_TOKENS, 1000, 18))

    def target(data: bytes) -> None:
        argv = _argv(rng)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()) as out:
            rc = entry.main(argv, io.BytesIO(data))
        text = err.getvalue()
        if rc not in (0, 1):
            raise BadOutput(f"{argv}: exit {rc}")
        if len(text.splitlines()) > 1 or "Traceback" in text or "internal error" in text:
            raise BadOutput(f"{argv}: {text[:800]!r}")
        if rc and not text.startswith("hvcpolicy: "):
            raise BadOutput(f"{argv}: failed without a message")
        if out.getvalue():
            raise BadOutput(f"{argv}: wrote to stdout: {out.getvalue()[:200]!r}")
        if len(argv) >= 2 and argv[1] in ("reconnect", "stopped", "release") and rc != 0:
            raise BadOutput(f"{argv}: {argv[1]} failed")

    fig = run_inputs(xmls, target, (InvalidInput,))
    assert fig.inputs == 3000
    assert_clean("hook-input/argv-stdin", fig)
