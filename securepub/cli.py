"""The ``securepub`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from securepub.errors import ConfigError


def _certs(args: argparse.Namespace) -> int:
    from securepub.devcerts import describe, ensure_dev_certs

    certs = ensure_dev_certs(os.path.abspath(args.certs_dir))
    print(describe(certs))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="securepub",
        description="Tools for the securepub publish/subscribe server.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    certs = commands.add_parser(
        "certs",
        help="generate (once) a development CA, a localhost certificate and an API key",
        description="Generate, once, a development CA, a localhost certificate signed by "
        "it and a random API key. Existing files are never overwritten.",
    )
    certs.add_argument(
        "--certs-dir",
        default="certs",
        metavar="DIR",
        help="where to write them (default: ./certs)",
    )
    certs.set_defaults(run=_certs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; errors are one line on stderr and a non-zero exit."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.run(args)
        return result
    except ConfigError as e:
        sys.stderr.write(f"securepub: error: {e}\n")
        return 1
    except OSError as e:
        sys.stderr.write(f"securepub: error: {e.strerror or e}\n")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
