"""``hvcpolicy``: parse argv, run one command, map errors to the documented exit codes."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from hvcpolicy import __version__
from hvcpolicy.errors import EXIT_INTERNAL, EXIT_USAGE, HvcError

# Each module registers its subcommands. Only the module of the command being run is imported,
# so one command never pays for another's dependencies (asyncio, libvirt, the simulator);
# ``--help`` and errors load them all.
COMMAND_MODULES = (
    "hvcpolicy.cli.offline",
    "hvcpolicy.cli.simulate",
    "hvcpolicy.cli.host",
    "hvcpolicy.cli.libvirt",
    "hvcpolicy.cli.apply",
    "hvcpolicy.cli.daytwo",
)
COMMANDS = {
    "validate": "hvcpolicy.cli.offline",
    "explain": "hvcpolicy.cli.offline",
    "baseline": "hvcpolicy.cli.offline",
    "check-migration": "hvcpolicy.cli.offline",
    "matrix": "hvcpolicy.cli.offline",
    "simulate": "hvcpolicy.cli.simulate",
    "host": "hvcpolicy.cli.host",
    "hook": "hvcpolicy.cli.libvirt",
    "attach": "hvcpolicy.cli.libvirt",
    "start": "hvcpolicy.cli.libvirt",
    "install-hook": "hvcpolicy.cli.libvirt",
    "apply": "hvcpolicy.cli.apply",
    "diff": "hvcpolicy.cli.daytwo",
    "status": "hvcpolicy.cli.daytwo",
}


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


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``command``, only that command's module is registered."""
    parser = _Parser(
        prog="hvcpolicy",
        description="Firmware-feature policy for arm64 KVM guests run by QEMU under libvirt.",
    )
    parser.add_argument("--version", action="version", version=f"hvcpolicy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    parent = common_options()
    modules = (COMMANDS[command],) if command in COMMANDS else COMMAND_MODULES
    for name in modules:
        importlib.import_module(name).register(sub, parent)
    return parser


def _command_of(argv: Sequence[str]) -> str | None:
    for arg in argv:
        if not arg.startswith("-"):
            return arg
        if arg in ("-h", "--help", "--version"):
            return None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    parser = build_parser(_command_of(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        rc: int = args.func(args)
        return rc
    except HvcError as err:
        if args.verbose:
            import traceback

            traceback.print_exc()
        sys.stderr.write(f"hvcpolicy: {err}\n")
        return err.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # a bug: one line unless -v
        if args.verbose:
            import traceback

            traceback.print_exc()
        sys.stderr.write(f"hvcpolicy: internal error: {type(err).__name__}: {err} (run with -v)\n")
        return EXIT_INTERNAL
