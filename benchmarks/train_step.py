"""``jb.train.make_step`` vs a hand-written ``jax.jit`` optax step on the same model and data.

Both donate the state, compute the loss and accuracy and apply one adam update; the ratio is
ours / hand-written (goal <= 1.02: the library adds no per-step cost).
"""

from __future__ import annotations

import argparse
import sys

import jax
import optax

import jaxopt_big as jb

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import interleaved, write  # noqa: E402


def main(quick: bool) -> None:
    width, batch, repeats = (256, 128, 30) if quick else (1024, 256, 50)
    model = jb.models.MLP(features=(width, width))
    x = jax.random.normal(jax.random.key(0), (batch, 64))
    y = jax.random.randint(jax.random.key(1), (batch,), 0, 10)
    params = model.init(jax.random.key(2), x)["params"]
    apply = lambda p, x: model.apply({"params": p}, x)
    tx = optax.adam(1e-3)

    loss_fn = jb.train.classifier_loss(apply)
    ours = jb.train.make_step(loss_fn, tx)

    def hand(p, s, x, y):
        def loss(p):
            logits = apply(p, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), (logits.argmax(-1) == y).mean()
        (l, acc), g = jax.value_and_grad(loss, has_aux=True)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, {"loss": l, "accuracy": acc}
    hand = jax.jit(hand, donate_argnums=(0, 1))

    copy = lambda t: jax.tree.map(lambda a: a.copy(), t)
    box = {"ours": jb.train.TrainState.create(copy(params), tx), "hand": (copy(params), tx.init(copy(params)))}

    def run_ours():
        box["ours"], m = ours(box["ours"], (x, y))
        return m["loss"]

    def run_hand():
        p, s = box["hand"]
        p, s, m = hand(p, s, x, y)
        box["hand"] = (p, s)
        return m["loss"]

    times = interleaved({"ours": run_ours, "hand": run_hand}, repeats=repeats, warmup=3)
    ratio = times["ours"] / times["hand"]
    write("train_step", ours=times["ours"], baseline=times["hand"], goal="ours / hand-written jit step <= 1.02",
          holds=ratio <= 1.02, details={"model": f"MLP 64-{width}-{width}-10, adam", "batch": batch,
                                        "repeats": repeats, "quick": quick})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller model, fewer repeats")
    main(parser.parse_args().quick)
