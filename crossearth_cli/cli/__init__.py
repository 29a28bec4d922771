"""Command-line entry point: ``crossearth``.

Each command lives in its own module and registers itself on :data:`app`. This module turns
user errors into one line on stderr and a documented exit code.
"""

from __future__ import annotations

import os
import sys
import traceback

from crossearth_cli.cli import convert, models, segment, vectorize  # noqa: F401  (register)
from crossearth_cli.cli.app import app
from crossearth_cli.errors import UserError

__all__ = ["app", "main"]


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args or os.environ.get("CROSSEARTH_DEBUG") == "1"
    try:
        app(args=args, prog_name="crossearth")
    except UserError as exc:
        if debug:
            traceback.print_exc()
        print(f"crossearth: error: {exc.one_line()}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("crossearth: interrupted; temporary files removed", file=sys.stderr)
        sys.exit(130)
