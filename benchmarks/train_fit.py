"""``jb.train.fit`` over two epochs vs a hand-written loop calling the same jitted step on the same batches.

The model is the MNIST-size CNN of the Flax examples (conv 32 + pool, conv 64 + pool, dense 256,
dense 10) on MNIST-shaped inputs (28x28x1, synthetic: nothing downloads), batch 64, adam. Both
candidates run the same ``jb.train.make_step`` step (``make_step`` alone is timed against a
hand-written ``jax.jit`` step by ``train_step.py``): the hand-written loop shuffles with the same
key, slices the same batches, calls the step and reads the last loss at the end of each epoch, which
is the least a training loop does. ``fit`` also reports every epoch's mean metrics. The ratio is
fit / hand-written (goal <= 1.03: the loop adds no per-step cost).
Run: ``python benchmarks/train_fit.py [--quick]``.
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxopt_big as jb

from common import interleaved, write

EPOCHS, BATCH = 2, 64


class MnistCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.avg_pool(nn.relu(nn.Conv(32, (3, 3))(x)), (2, 2), (2, 2))
        x = nn.avg_pool(nn.relu(nn.Conv(64, (3, 3))(x)), (2, 2), (2, 2))
        x = nn.relu(nn.Dense(256)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(x)


def hand_loop(step, state, train: jb.data.Dataset, key: jax.Array):
    """Shuffle, slice, step; one host read per epoch (the last loss)."""
    steps = len(train) // BATCH
    for epoch_key in jax.random.split(key, EPOCHS):
        order = np.asarray(jax.random.permutation(epoch_key, len(train)))
        for i in range(steps):
            idx = order[i * BATCH:(i + 1) * BATCH]
            state, metrics = step(state, (train.x[idx], train.y[idx]))
        float(metrics["loss"])
    return state


def main(quick: bool) -> None:
    n, repeats = (512, 3) if quick else (2048, 7)
    rng = np.random.default_rng(0)
    train = jb.data.Dataset(rng.random((n, 28, 28, 1), np.float32), rng.integers(0, 10, n).astype(np.int32))
    model = MnistCNN()
    params = model.init(jax.random.key(0), train.x[:1])["params"]
    tx = optax.adam(1e-3)
    step = jb.train.make_step(jb.train.classifier_loss(lambda p, x: model.apply({"params": p}, x)), tx)
    key = jax.random.key(1)
    fresh = lambda: jb.train.TrainState.create(params, tx)

    ours = lambda: jb.train.fit(step, fresh(), train, epochs=EPOCHS, batch_size=BATCH, key=key, progress=False)[0]
    hand = lambda: hand_loop(step, fresh(), train, key)
    a, b = ours(), hand()
    np.testing.assert_allclose(jax.tree.leaves(a.params)[0], jax.tree.leaves(b.params)[0], rtol=1e-5, atol=1e-6)
    times = interleaved({"fit": ours, "hand": hand}, repeats=repeats, warmup=1)
    ratio = times["fit"] / times["hand"]
    write("train_fit", ours=times["fit"], baseline=times["hand"],
          goal="fit / hand-written loop over the same step and batches <= 1.03", holds=ratio <= 1.03,
          details={"model": "MNIST CNN: conv32-pool-conv64-pool-dense256-dense10, adam",
                   "params": jb.models.count_params(params), "examples": n, "epochs": EPOCHS, "batch": BATCH,
                   "steps": EPOCHS * (n // BATCH), "repeats": repeats, "quick": quick})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    main(parser.parse_args().quick)
