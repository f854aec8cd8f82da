"""The ``jaxopt-big`` command.

``jaxopt-big demo`` trains the reference CNN on the embedded digits data and prints the hold-out
accuracy and the compression report. Bad options exit with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, no usage dump or traceback
        self.exit(2, f"{self.prog}: error: {message}\n")


def _demo(args: argparse.Namespace) -> int:
    import jax
    import optax

    import jaxopt_big as jb

    train, test = jb.data.holdout_split(jb.data.digits(), test_fraction=0.2, seed=args.seed)
    model = jb.models.CNN()
    key_init, key_fit = jax.random.split(jax.random.key(args.seed))
    params = model.init(key_init, train.x[:1])["params"]
    apply = lambda p, x: model.apply({"params": p}, x)
    tx = optax.adam(2e-3)
    step = jb.train.make_step(jb.train.classifier_loss(apply), tx)
    epochs = args.epochs or (6 if args.quick else 15)
    start = time.perf_counter()
    state, _ = jb.train.fit(step, jb.train.TrainState.create(params, tx), train, epochs=epochs,
                            batch_size=64, key=key_fit, desc="dense CNN")
    seconds = time.perf_counter() - start
    metrics = jb.train.evaluate(apply, state.params, test)
    report = jb.report.summary(state.params)
    print(f"dense CNN: hold-out accuracy {metrics['accuracy']:.4f} after {epochs} epochs ({seconds:.1f} s)")
    print(report)
    if args.out:
        import pathlib
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(f"# jaxopt-big demo\n\nhold-out accuracy {metrics['accuracy']:.4f}\n\n"
                                       + report.to_markdown() + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(prog="jaxopt-big", description="Compress JAX models: prune, quantize, factorize, distill.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = sub.add_parser("demo", help="train on the embedded digits data and compress it every way")
    demo.add_argument("--quick", action="store_true", help="a shorter run (CI size)")
    demo.add_argument("--epochs", type=int, default=None, help="training epochs of the dense model")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default=None, help="folder for report.md, plots and checkpoints")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
