"""``python -m hvcpolicy.simulator ARGS``: ``hvcpolicy simulate ARGS`` without loading the other
commands (handy for tests of other components while the rest of the CLI is being changed)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from hvcpolicy.cli import main as cli
from hvcpolicy.cli import simulate
from hvcpolicy.errors import EXIT_INTERNAL, HvcError


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli._Parser(prog="python -m hvcpolicy.simulator")
    sub = parser.add_subparsers(dest="command", parser_class=cli._Parser)
    simulate.register(sub, cli.common_options())
    args = parser.parse_args(["simulate", *(sys.argv[1:] if argv is None else argv)])
    try:
        rc: int = args.func(args)
        return rc
    except HvcError as err:
        if args.verbose:
            raise
        sys.stderr.write(f"hvcpolicy: {err}\n")
        return err.exit_code
    except Exception as err:
        if args.verbose:
            raise
        sys.stderr.write(f"hvcpolicy: internal error: {type(err).__name__}: {err} (run with -v)\n")
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
