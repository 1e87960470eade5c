"""The ``colabkit`` command line: ``colabkit info | stage | bench``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from colabkit.errors import ColabkitError

__all__ = ["main"]


def _info(_: list[str]) -> int:
    from colabkit.info import info

    info()
    return 0


def _stage(argv: list[str]) -> int:
    from colabkit.data.stage import cli_stage

    return cli_stage(argv)


def _bench(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="colabkit bench", description="Matrix-multiply speed of each device.")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048], help="square matrix sizes")
    args = parser.parse_args(argv)
    from colabkit.bench import matmul_speed

    print(matmul_speed(sizes=args.sizes))
    return 0


_COMMANDS = {
    "info": (_info, "print the runtime, versions, GPUs, RAM, disk and Drive"),
    "stage": (_stage, "copy a dataset (archive, folder, URL, Drive link, bucket) to fast local disk"),
    "bench": (_bench, "time matrix multiplication on CPU and GPU"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run a ``colabkit`` command; returns the process exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or args[0] not in _COMMANDS:
        lines = ["usage: colabkit COMMAND [ARGS...]", "", "commands:"]
        lines += [f"  {name:<7}{help_text}" for name, (_, help_text) in _COMMANDS.items()]
        if args and args[0] not in ("-h", "--help"):
            print(f"colabkit: unknown command {args[0]!r}", file=sys.stderr)
            print("\n".join(lines), file=sys.stderr)
            return 2
        print("\n".join(lines))
        return 0
    handler, _ = _COMMANDS[args[0]]
    try:
        return handler(args[1:])
    except ColabkitError as exc:
        print(f"colabkit {args[0]}: error: {exc}", file=sys.stderr)
        return 1
