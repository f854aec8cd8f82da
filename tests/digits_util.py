"""Shared helpers for the end-to-end digits tests: one split, a trainer, accuracy."""

from __future__ import annotations

import functools

import jax
import optax

import jaxopt_big as jb


@functools.cache
def split(flat: bool = False, seed: int = 0):
    """The stratified 80/20 hold-out split of digits used by every end-to-end test."""
    return jb.data.holdout_split(jb.data.digits(flat=flat), test_fraction=0.2, seed=seed)


def fit(apply, params, train, *, epochs: int, lr: float = 2e-3, tx=None, loss_fn=None, seed: int = 0,
        batch_size: int = 64):
    """Trains ``params`` with adam (or ``tx``) on the cross-entropy of ``apply``; returns params."""
    steps = epochs * (len(train) // batch_size)
    tx = tx or optax.adam(optax.cosine_decay_schedule(lr, max(steps, 1)))
    step = jb.train.make_step(loss_fn or jb.train.classifier_loss(apply), tx)
    state, _ = jb.train.fit(step, jb.train.TrainState.create(params, tx), train, epochs=epochs,
                            batch_size=batch_size, key=jax.random.key(seed), progress=False)
    return state.params


def accuracy(apply, params, test) -> float:
    return jb.train.evaluate(apply, params, test)["accuracy"]


@functools.cache
def dense_cnn(epochs: int = 20, seed: int = 0):
    """A trained digits CNN: (model, apply, params, accuracy); cached per test process."""
    train, test = split()
    model = jb.models.CNN()
    params = model.init(jax.random.key(seed), train.x[:1])["params"]
    apply = lambda p, x: model.apply({"params": p}, x)
    params = fit(apply, params, train, epochs=epochs, seed=seed)
    return model, apply, params, accuracy(apply, params, test)


@functools.cache
def dense_mlp(epochs: int = 30, seed: int = 0, features: tuple[int, ...] = (256, 256)):
    """A trained digits MLP on flat inputs: (model, apply, params, accuracy); cached per process."""
    train, test = split(flat=True)
    model = jb.models.MLP(features=features)
    params = model.init(jax.random.key(seed), train.x[:1])["params"]
    apply = lambda p, x: model.apply({"params": p}, x)
    params = fit(apply, params, train, epochs=epochs, seed=seed)
    return model, apply, params, accuracy(apply, params, test)
