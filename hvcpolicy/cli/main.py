"""``hvcpolicy``: parse argv, run one command, map errors to the documented exit codes."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from hvcpolicy import __version__
from hvcpolicy.errors import EXIT_INTERNAL, EXIT_USAGE, HvcError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

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
    "hvcpolicy.cli.image",
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
    "image": "hvcpolicy.cli.image",
}


class _Formatter(argparse.HelpFormatter):
    """argparse's own, but finding the terminal's width without importing ``shutil`` (and with
    it ``bz2`` and ``lzma``: ~1.4 ms of every command, ``start`` included)."""

    def __init__(
        self,
        prog: str,
        indent_increment: int = 2,
        max_help_position: int = 24,
        width: int | None = None,
    ) -> None:
        if width is None:
            width = _columns() - 2  # as argparse does
        super().__init__(prog, indent_increment, max_help_position, width)


def _columns() -> int:
    """What ``shutil.get_terminal_size()`` answers: $COLUMNS, else stdout's terminal, else 80."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns > 0:
        return columns
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns or 80  # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError):
        return 80


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse prints usage and exits 2; keep it to one line, as every other error.
        sys.stderr.write(f"hvcpolicy: {message} (see --help)\n")
        raise SystemExit(EXIT_USAGE)


class _Only:
    """The subcommands as a module's ``register`` sees them when one command runs: the module's
    other commands are not built (argparse spends ~0.5 ms on each)."""

    def __init__(self, sub: Any, name: str) -> None:
        self._sub = sub
        self._name = name

    def add_parser(self, name: str, **kwargs: Any) -> Any:
        return self._sub.add_parser(name, **kwargs) if name == self._name else _Unbuilt()


class _Unbuilt:
    """A parser that is not built: takes every call and does nothing."""

    def __getattr__(self, _name: str) -> Any:
        return self._ignore

    def _ignore(self, *_args: Any, **_kwargs: Any) -> _Unbuilt:
        return self


def common_options() -> argparse.ArgumentParser:
    parent = _Parser(add_help=False)
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
    if command in COMMANDS:  # only this command's parser is built
        importlib.import_module(COMMANDS[command]).register(_Only(sub, command), parent)
    else:
        for name in COMMAND_MODULES:
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


def run() -> None:
    """The ``hvcpolicy`` command: :func:`main`, then exit without the interpreter's teardown.
    Every file hvcpolicy writes is closed by then; unloading libvirt-python alone costs
    ``hvcpolicy start`` about 4 ms, on a path libvirt users wait on."""
    rc = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # stdout closed early (`| head`): what could be said was said
        rc = rc or EXIT_INTERNAL
    os._exit(rc)
