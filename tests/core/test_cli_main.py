"""The command registry: every command reachable, each loading only its own module."""

from __future__ import annotations

import subprocess
import sys

from hvcpolicy.cli.main import COMMAND_MODULES, COMMANDS, build_parser
from tests.conftest import REPO


def test_every_registered_command_is_in_the_table() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert set(sub.choices) == set(COMMANDS)  # type: ignore[attr-defined]
    assert set(COMMANDS.values()) == set(COMMAND_MODULES)


def test_an_offline_command_imports_no_simulator_asyncio_or_libvirt() -> None:
    code = (
        "import sys; from hvcpolicy.cli.main import main; "
        "rc = main(['validate', 'examples/policies']); "
        "heavy = ('asyncio', 'libvirt', 'hvcpolicy.simulator', 'qemu'); "
        "bad = [m for m in heavy if m in sys.modules]; "
        "print(rc, bad)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert out.stdout.strip().splitlines()[-1] == "0 []", out.stdout + out.stderr


def test_verbose_keeps_the_exit_code_and_adds_the_traceback() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "hvcpolicy", "validate", "-v", "examples/broken/bad-mode.yaml"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert out.returncode == 4
    out = subprocess.run(
        [sys.executable, "-m", "hvcpolicy", "explain", "-v", "--policy", "nope", "--host", "x"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert out.returncode == 4 and "Traceback" in out.stderr
