"""The ``jaxopt-big`` command.

``jaxopt-big demo`` trains the reference CNN on the embedded digits data, compresses it every way
the library supports and prints one table (see :mod:`jaxopt_big.demo`); ``jaxopt-big report DIR``
prints the per-layer table of a saved checkpoint, read back and rebuilt from its files. Bad options,
an unwritable ``--out`` folder, a missing or unreadable checkpoint exit with status 2 and a one-line
message.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, no usage dump or traceback
        self.exit(2, f"{self.prog}: error: {message}\n")


def _demo(args: argparse.Namespace) -> int:
    from jaxopt_big import demo

    try:
        out = demo.writable(args.out)  # before minutes of training
        demo.run(quick=args.quick, seed=args.seed, out=out)
    except OSError as e:  # a late failure (disk full) is one line too
        print(f"jaxopt-big: error: {e}", file=sys.stderr)
        return 2
    return 0


def _parameters(tree: Any) -> Any:
    """The parameters of a saved ``TrainState`` (restored as a dict), else the whole saved tree."""
    return tree["params"] if isinstance(tree, dict) and {"params", "opt_state"} <= tree.keys() else tree


def _report(args: argparse.Namespace) -> int:
    import pathlib

    from jaxopt_big import checkpoint, report

    directory = pathlib.Path(args.checkpoint_dir)
    if not directory.is_dir():
        problem = "is not a directory" if directory.exists() else "does not exist"
        print(f"jaxopt-big: error: checkpoint directory {str(directory)!r} {problem}", file=sys.stderr)
        return 2
    manager = checkpoint.Manager(directory, async_save=False)
    step = manager.latest_step() if args.step is None else args.step
    if step is None:
        print(f"jaxopt-big: error: no checkpoint in {str(directory)!r}", file=sys.stderr)
        return 2
    try:  # what is reported is what restores: truncated or corrupt data is an error, not a table
        extra = manager.extra(step)
        table = report.summary(_parameters(manager.restore(step)))
    except (FileNotFoundError, ValueError) as e:
        print(f"jaxopt-big: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    disk = checkpoint.disk_bytes(manager.step_directory(step))
    print(f"{extra.get('method', directory.name)} (step {step}, {disk:,} bytes on disk)")
    print(table)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``jaxopt-big`` command line (``argv`` defaults to ``sys.argv[1:]``); returns the exit status."""
    parser = _Parser(prog="jaxopt-big", description="Compress JAX models: prune, quantize, factorize, distill.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = sub.add_parser("demo", help="train on the embedded digits data and compress it every way")
    demo.add_argument("--quick", action="store_true", help="a shorter run (CI size)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="demo-out", help="folder for report.md, results.json, the plot and "
                      "checkpoints (default: demo-out)")
    rep = sub.add_parser("report", help="print the per-layer table of a saved checkpoint (of a TrainState: "
                                        "its parameters)")
    rep.add_argument("checkpoint_dir", help="a directory written by jaxopt_big.checkpoint.Manager")
    rep.add_argument("--step", type=int, default=None, help="which step (default: the latest)")
    args = parser.parse_args(argv)
    return {"demo": _demo, "report": _report}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
