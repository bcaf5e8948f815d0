"""Fuzz the QMP replies hvcpolicy's one QMP client (hvcpolicy.qmp) parses, through both flows
the hook and the CLI run over it: ``enforce`` (apply, start, the hook's ``started``) and
``inspect`` (``reconnect``, ``status``).

A hostile server (hostileqmp.py) answers each command correctly, or malformed, truncated,
oversized, dripped a few bytes at a time, with a wrong id, out of order, preceded by a stray
reply or an event, or not at all. Whatever it does, a client must end with a result or an
hvcpolicy error (exit 5 class) within its whole-command budget, never a traceback and never a
message longer than the bound.
"""

from __future__ import annotations

import time

import pytest

from hvcpolicy.errors import HvcError
from tests.hardening.fuzzlib import HANG_SECONDS, Figures, assert_clean, run_inputs
from tests.hardening.hostileqmp import hostile_qmp
from tests.hardening.targets import operator_policies

TIMEOUT = 0.2
# A client may spend one timeout per command it sends (about 8), plus closing: anything near
# HANG_SECONDS (2 s) means a wait was not bounded by the timeout.
assert HANG_SECONDS > 8 * TIMEOUT


def _inspect_session(path: str) -> None:
    from hvcpolicy.enforce import inspect
    from hvcpolicy.qmp import QMP

    with QMP(path, TIMEOUT) as qmp:
        inspect(qmp, operator_policies()[0])


def _apply_session(path: str) -> None:
    from hvcpolicy.enforce import enforce_at

    enforce_at(path, operator_policies()[0], timeout=TIMEOUT, resume=True)


def _checked(session: object) -> object:
    def target(data: bytes) -> None:
        seed = int.from_bytes(data, "big")
        SERVER.script(seed)
        try:
            session(SERVER.path)  # type: ignore[operator]
        except HvcError as err:
            text = str(err)
            assert "\n" not in text, f"multi-line message: {text!r}"
            assert len(text) <= 2100, f"unbounded message ({len(text)} chars)"
            raise

    return target


SERVER: object = None

CASES = {"inspect": (_inspect_session, 150), "apply": (_apply_session, 300)}


@pytest.mark.parametrize("client", sorted(CASES))
def test_fuzz_qmp_replies(client: str) -> None:
    global SERVER
    session, count = CASES[client]
    with hostile_qmp(drip_pause=TIMEOUT / 5) as server:
        SERVER = server
        seeds = (i.to_bytes(4, "big") for i in range(count))
        start = time.monotonic()
        fig = run_inputs(seeds, _checked(session), (HvcError,))  # type: ignore[arg-type]
        fig.seconds = time.monotonic() - start
    assert fig.inputs == count
    assert_clean(f"qmp-replies/{client}", fig)


SESSIONS = {"inspect": _inspect_session, "apply": _apply_session}


@pytest.mark.parametrize("client", ["apply", "inspect"])
def test_a_dripping_server_cannot_stretch_a_command_past_its_timeout(client: str) -> None:
    """Slow loris: every few bytes arrive within the timeout, the whole reply never does. The
    timeout bounds the command, not each recv."""
    import random

    from tests.hardening.hostileqmp import ACTIONS

    global SERVER
    fig = Figures()
    # seeds whose first action (the greeting) is "drip"
    seeds = [s for s in range(5000) if random.Random(s).choice(ACTIONS) == "drip"][:3]
    with hostile_qmp(drip_pause=TIMEOUT / 2) as server:
        SERVER = server
        for seed in seeds:
            server.script(seed)
            start = time.monotonic()
            with pytest.raises(HvcError):
                SESSIONS[client](server.path)
            took = time.monotonic() - start
            fig.inputs += 1
            assert took < 3 * TIMEOUT + 1.0, f"{client}: a dripped greeting held it {took:.1f} s"
    assert_clean(f"qmp-replies/drip-{client}", fig)


def test_apply_cli_stays_one_line_when_negotiation_is_garbled() -> None:
    """Seeds whose replies garble the capabilities negotiation: as a real process, apply must
    exit 5 with one stderr line."""
    import subprocess
    import sys

    from tests.hardening.simthread import REPO

    with hostile_qmp(drip_pause=0.04) as server:
        for seed in (120, 168, 256):
            server.script(seed)
            done = subprocess.run(
                [
                    sys.executable, "-m", "hvcpolicy", "apply", "--qmp", server.path,
                    "--policy", str(REPO / "examples/policies/fleet-2026.yaml"),
                    "--timeout", str(TIMEOUT),
                ],
                capture_output=True, text=True, timeout=60, cwd=REPO, check=False,
            )  # fmt: skip
            assert done.returncode == 5, done.stderr[:300]
            assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr
