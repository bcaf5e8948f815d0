"""``hvcpolicy``: parse argv, run one command, map errors to the documented exit codes."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from hvcpolicy import __version__
from hvcpolicy.errors import EXIT_INTERNAL, EXIT_USAGE, HvcError

# Each module registers its subcommands; imported lazily-by-name so that a command's heavy
# dependencies (asyncio, libvirt) are loaded only when that command runs.
COMMAND_MODULES = (
    "hvcpolicy.cli.offline",
    "hvcpolicy.cli.simulate",
    "hvcpolicy.cli.host",
    "hvcpolicy.cli.libvirt",
    "hvcpolicy.cli.apply",
    "hvcpolicy.cli.daytwo",
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse prints usage and exits 2; keep it to one line, as every other error.
        sys.stderr.write(f"hvcpolicy: {message} (see --help)\n")
        raise SystemExit(EXIT_USAGE)


def common_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--format", choices=("text", "json"), default="text", help="output format")
    parent.add_argument("-v", "--verbose", action="store_true", help="tracebacks and detail")
    parent.add_argument("--connect", metavar="URI", default=None, help="libvirt URI")
    parent.add_argument(
        "--policy-dir",
        metavar="DIR",
        default=None,
        help="operator policies (default $HVCPOLICY_POLICY_DIR or /etc/hvcpolicy/policies)",
    )
    return parent


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hvcpolicy",
        description="Firmware-feature policy for arm64 KVM guests run by QEMU under libvirt.",
    )
    parser.add_argument("--version", action="version", version=f"hvcpolicy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    parent = common_options()
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub, parent)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        rc: int = args.func(args)
        return rc
    except HvcError as err:
        if args.verbose:
            raise
        sys.stderr.write(f"hvcpolicy: {err}\n")
        return err.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # a bug: one line unless -v
        if args.verbose:
            raise
        sys.stderr.write(f"hvcpolicy: internal error: {type(err).__name__}: {err} (run with -v)\n")
        return EXIT_INTERNAL
