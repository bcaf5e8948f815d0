"""Completion and the man page are generated from the parser (scripts/gen-docs.py), are current,
and name every command; every command's --help ends with an example; building the parser stays
light.

Tests marked ``contract`` hold every command module to a CLI rule; when one fails, its message
lists the offending commands or modules (owned by whoever wrote them), one per line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from hvcpolicy.cli.main import COMMAND_MODULES, build_parser
from tests.conftest import REPO

SCRIPT = REPO / "scripts" / "gen-docs.py"
BASH = REPO / "packaging" / "completion" / "hvcpolicy.bash"
ZSH = REPO / "packaging" / "completion" / "_hvcpolicy"
MAN = REPO / "packaging" / "man" / "hvcpolicy.1"


def gen_docs() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_docs", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def commands(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every (sub)command, depth first: (("host", "probe"), parser), ..."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.append(((*prefix, name), sub))
                out.extend(commands(sub, (*prefix, name)))
    return out


def test_generated_files_are_current() -> None:
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""


def test_the_check_notices_a_stale_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mod = gen_docs()
    monkeypatch.setattr(mod, "COMPLETION", tmp_path / "completion")
    monkeypatch.setattr(mod, "MAN", tmp_path / "man")
    monkeypatch.setattr(mod, "REPO", tmp_path)
    assert mod.main([]) == 0
    assert mod.main(["--check"]) == 0
    page = tmp_path / "man" / "hvcpolicy.1"
    good = page.read_text()
    assert "hvcpolicy diff" in good
    page.write_text(good.replace("hvcpolicy diff", "hvcpolicy dif"))
    assert mod.main(["--check"]) == 1
    assert mod.main([]) == 0
    assert page.read_text() == good
    assert mod.main(["--check"]) == 0


def test_every_command_is_in_completion_and_man_page() -> None:
    bash, zsh, man = BASH.read_text(), ZSH.read_text(), MAN.read_text()
    assert man.startswith('.TH HVCPOLICY "1"')
    missing = []
    found = commands(build_parser())
    assert {"diff", "status", "validate"} <= {path[-1] for path, _ in found}
    for path, _ in found:
        name = path[-1]
        in_man = f"hvcpolicy {' '.join(path)}".replace("-", "\\-") in man
        # shtab lists each level's names as a bash array: (validate explain ...), (probe)
        in_bash = re.search(rf"[( ]{re.escape(name)}[ )]", bash) is not None
        in_zsh = f"\n    {name}:'" in zsh
        if not (in_man and in_bash and in_zsh):
            missing.append(f"{' '.join(path)}: man={in_man} bash={in_bash} zsh={in_zsh}")
    assert not missing, "\n".join(missing)


def test_bash_completion_loads_and_completes_diff_files() -> None:
    script = (
        f"source {BASH}; COMP_WORDS=(hvcpolicy di); COMP_CWORD=1; COMP_LINE='hvcpolicy di'; "
        "COMP_POINT=${#COMP_LINE}; _shtab_hvcpolicy; printf '%s\\n' \"${COMPREPLY[@]}\""
    )
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["diff"]


@pytest.mark.contract
def test_every_command_help_ends_with_an_example() -> None:
    offenders = []
    for path, sub in commands(build_parser()):
        epilog = (sub.epilog or "").strip()
        if not epilog.startswith("example:") or "\n\n" in epilog:
            offenders.append(f"hvcpolicy {' '.join(path)}: epilog {epilog[:40]!r}")
            continue
        # and --help really ends with it (nothing printed after the example)
        assert sub.format_help().rstrip().endswith(epilog.split()[-1]), path
    assert not offenders, "commands whose --help does not end with an example:\n" + "\n".join(
        offenders
    )


def test_diff_and_status_help_end_with_their_example() -> None:
    for name in ("diff", "status"):
        r = subprocess.run(
            [sys.executable, "-m", "hvcpolicy", name, "--help"],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )
        assert r.returncode == 0
        last = r.stdout.rstrip().split("\n\n")[-1]
        assert last.startswith(f"example: hvcpolicy {name} "), last


HEAVY = ("libvirt", "libvirt_qemu", "asyncio", "qemu.qmp")


def _imported_by(code: str) -> list[str]:
    probe = f"import sys\n{code}\nprint(__import__('json').dumps(sorted(sys.modules)))"
    r = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert r.returncode == 0, r.stderr
    return [m for m in json.loads(r.stdout) if m in HEAVY]


def test_daytwo_commands_register_without_heavy_imports() -> None:
    code = (
        "import argparse\nfrom hvcpolicy.cli import daytwo\nfrom hvcpolicy.cli.main import "
        "common_options\np = argparse.ArgumentParser()\n"
        "daytwo.register(p.add_subparsers(), common_options())"
    )
    assert _imported_by(code) == []


@pytest.mark.contract
def test_building_the_parser_imports_neither_libvirt_nor_asyncio() -> None:
    offenders = []
    for name in COMMAND_MODULES:
        heavy = _imported_by(f"import {name}")
        if heavy:
            offenders.append(f"{name} imports {', '.join(heavy)} at top level")
    assert not offenders, "\n".join(offenders)
