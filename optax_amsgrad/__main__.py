"""The command line: ``python -m optax_amsgrad demo [--steps N] [--plot FILE.png]``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from optax_amsgrad import _demo


def main(argv: Sequence[str] | None = None) -> int:
  """Parses ``argv`` (default ``sys.argv[1:]``), runs the command, returns
  the exit status. Bad arguments exit with status 2 and a message."""
  parser = argparse.ArgumentParser(
      prog="python -m optax_amsgrad",
      description="optax-amsgrad from the command line.",
      epilog="Example: python -m optax_amsgrad demo --plot figure1.png",
  )
  subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
  _demo.add_parser(subparsers)
  args = parser.parse_args(argv)
  command_parser: argparse.ArgumentParser = subparsers.choices[args.command]
  return int(args.func(args, command_parser))


if __name__ == "__main__":
  sys.exit(main())
