#!/usr/bin/env python3
"""Generate shell completion (shtab) and the man page (argparse-manpage) from the parser.

    python3 scripts/gen-docs.py           # (re)write packaging/completion/ and packaging/man/
    python3 scripts/gen-docs.py --check   # exit 1, naming the stale files, when not current

Nothing here is written by hand: every word comes from ``hvcpolicy.cli.main.build_parser()``,
so a new option or command shows up in completion and in ``man hvcpolicy`` on the next run
(tests/daytwo/test_docs.py fails until then).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMPLETION = REPO / "packaging" / "completion"
MAN = REPO / "packaging" / "man"


def _parser() -> argparse.ArgumentParser:
    # argparse wraps help to the terminal's width: fix it, or the output depends on who ran it
    os.environ["COLUMNS"] = "80"
    sys.path.insert(0, str(REPO))
    from hvcpolicy.cli.main import build_parser

    return build_parser()


def render() -> dict[Path, str]:
    """Every generated file and its content."""
    import shtab
    from argparse_manpage.manpage import Manpage

    from hvcpolicy import __version__

    out: dict[Path, str] = {
        COMPLETION / "hvcpolicy.bash": shtab.complete(_parser(), shell="bash"),
        COMPLETION / "_hvcpolicy": shtab.complete(_parser(), shell="zsh"),
    }
    man = Manpage(_parser())
    # argparse-manpage's documented way to set the header: override the attributes.
    man.source = f"hvcpolicy {__version__}"
    man.manual = "hvcpolicy manual"
    man.description = "firmware-feature policy for arm64 KVM guests under QEMU and libvirt"
    man.date = ""  # reproducible: the version says which release this page belongs to
    out[MAN / "hvcpolicy.1"] = str(man)
    return {path: text if text.endswith("\n") else text + "\n" for path, text in out.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--check", action="store_true", help="compare, write nothing")
    args = ap.parse_args(argv)
    stale = []
    for path, text in render().items():
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    rel = ", ".join(str(p.relative_to(REPO)) for p in stale)
    if args.check and stale:
        sys.stderr.write(f"gen-docs: stale: {rel} (run python3 scripts/gen-docs.py)\n")
        return 1
    if stale:
        sys.stdout.write(f"gen-docs: wrote {rel}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
