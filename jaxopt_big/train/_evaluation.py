"""Evaluation of a classifier over a dataset."""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_big import _checks
from jaxopt_big import data as _data
from jaxopt_big.train._state import TrainState
from jaxopt_big.train._step import apply_gradients, classifier_loss, grads_and_metrics

__all__ = ["evaluate", "kfold", "cross_validate", "CrossValidation"]


def check_dataset(name: str, ds: Any) -> None:
    """``ds`` is a :class:`jaxopt_big.data.Dataset` (a bare ``(x, y)`` tuple is not: its length is 2)
    with as many inputs as labels (its length is the labels', so extra inputs would go unseen)."""
    if not isinstance(ds, _data.Dataset):
        raise TypeError(f"{name} must be a jb.data.Dataset(x, y), got {type(ds).__name__}; "
                        f"wrap arrays as jb.data.Dataset(x, y)")
    nx, ny = (np.shape(a)[0] if np.ndim(a) else None for a in ds)
    if nx != ny:
        raise ValueError(f"{name} has {nx} inputs (x) but {ny} labels (y); they must pair up one to one")


def _check_labels(name: str, y: np.ndarray, classes: int) -> None:
    """Integer labels in ``[0, classes)``: others give a NaN loss or a silently wrong accuracy."""
    y = np.asarray(y)
    if not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"{name}.y must hold integer class labels, got dtype {y.dtype}")
    bad = np.flatnonzero((y < 0) | (y >= classes))
    if bad.size:
        raise ValueError(f"{name}.y[{bad[0]}] = {y[bad[0]]} is not a class of the model's {classes} logits "
                         f"({bad.size} labels outside [0, {classes}))")


def evaluate(apply_fn: Callable[[Any, jax.Array], jax.Array], params: Any, ds: _data.Dataset,
             *, batch_size: int = 512) -> dict[str, float]:
    """Mean softmax cross-entropy and accuracy of ``apply_fn(params, x)`` logits over ``ds``.

    Examples:
      >>> import jax.numpy as jnp
      >>> ds = _data.Dataset(np.eye(2, dtype=np.float32), np.array([0, 1]))
      >>> evaluate(lambda p, x: x @ p, jnp.eye(2) * 10, ds)["accuracy"]
      1.0
    """
    check_dataset("evaluate.ds", ds)
    batch_size = _checks.integer("evaluate.batch_size", batch_size, low=1)
    if not len(ds):
        raise ValueError("evaluate.ds is empty: there is nothing to average over")
    _check_labels("evaluate.ds", ds.y, jax.eval_shape(apply_fn, params, ds.x[:1]).shape[-1])

    @jax.jit
    def forward(p, x, y):
        logits = apply_fn(p, x).astype(jnp.float32)  # bf16 logits: sum the losses in float32
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).sum(), (logits.argmax(-1) == y).sum()

    loss = correct = 0.0
    for batch in _data.batches(ds, batch_size):
        batch_loss, batch_correct = forward(params, batch.x, batch.y)
        loss, correct = loss + float(batch_loss), correct + float(batch_correct)
    return {"loss": loss / len(ds), "accuracy": correct / len(ds)}


def kfold(n: int, k: int, key: jax.Array, *, labels: np.ndarray | None = None
          ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``k`` shuffled ``(train_idx, test_idx)`` splits of ``range(n)``; each index is tested once.

    With ``labels`` the folds are stratified: every class is spread over the folds as evenly as
    possible (its count per fold differs by at most one), and fold sizes differ by at most one.

    Raises:
      TypeError: ``n`` or ``k`` not an int (a bool is not).
      ValueError: ``n < 2``, ``k`` outside ``[2, n]`` or ``labels`` of another length than ``n``.

    Examples:
      >>> folds = list(kfold(10, 5, jax.random.key(0), labels=np.arange(10) % 2))
      >>> [len(test) for _, test in folds], sorted(np.concatenate([t for _, t in folds]).tolist()) == list(range(10))
      ([2, 2, 2, 2, 2], True)
    """
    n = _checks.integer("kfold.n", n, low=2)
    k = _checks.integer("kfold.k", k, low=2, high=n)
    labels = np.zeros(n, np.int64) if labels is None else np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {labels.shape}")
    order = np.asarray(jax.random.permutation(key, n))
    # classes one after another, each shuffled; dealing them round-robin stratifies the folds
    order = order[np.argsort(labels[order], kind="stable")]
    fold_of = np.empty(n, np.int64)
    fold_of[order] = np.arange(n) % k
    for f in range(k):
        yield np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)


@dataclasses.dataclass(frozen=True)
class CrossValidation:
    """Per-fold metrics and their mean and (population) standard deviation."""

    folds: tuple[dict[str, float], ...]

    @property
    def mean(self) -> dict[str, float]:
        return {m: float(np.mean([f[m] for f in self.folds])) for m in self.folds[0]}

    @property
    def std(self) -> dict[str, float]:
        return {m: float(np.std([f[m] for f in self.folds])) for m in self.folds[0]}

    def __str__(self) -> str:
        metrics = ", ".join(f"{m} {self.mean[m]:.4f} ± {self.std[m]:.4f}" for m in self.folds[0])
        return f"{metrics} ({len(self.folds)} folds)"


def cross_validate(init_fn: Callable[[jax.Array], Any], apply_fn: Callable[[Any, jax.Array], jax.Array],
                   ds: _data.Dataset, tx: optax.GradientTransformation, *, k: int = 5, epochs: int, batch_size: int,
                   key: jax.Array, loss_fn: Callable[..., Any] | None = None, vmap: bool = False,
                   stratified: bool = True) -> CrossValidation:
    """K-fold cross-validation of a classifier: train on k-1 folds, :func:`evaluate` on the held-out one.

    Every fold trains fresh parameters ``init_fn(key_f)`` with ``tx`` on the same schedule: each
    epoch shuffles the fold's training indices and runs ``min_f(len(train_f)) // batch_size``
    steps, so with ``vmap=True`` all folds train at once as one vmapped step and give the same
    numbers as the sequential loop.

    Args:
      init_fn: ``key -> params``.
      apply_fn: ``(params, x) -> logits``.
      ds, tx, k, epochs, batch_size, key: data, optimizer, folds and schedule.
      loss_fn: ``(params, (x, y)) -> (loss, aux)``; softmax cross-entropy of ``apply_fn`` by default.
      vmap: train all folds together (k times the memory, one compiled step).
      stratified: stratify the folds by ``ds.y``.

    Examples:
      >>> ds = _data.Dataset(np.tile(np.eye(2, dtype=np.float32), (10, 1)), np.tile([0, 1], 10))
      >>> cv = cross_validate(lambda key: jax.numpy.zeros((2, 2)), lambda p, x: x @ p, ds, optax.sgd(1.0),
      ...                     k=2, epochs=2, batch_size=4, key=jax.random.key(0))
      >>> cv.mean["accuracy"], cv.std["accuracy"]
      (1.0, 0.0)
    """
    check_dataset("cross_validate.ds", ds)
    epochs = _checks.integer("cross_validate.epochs", epochs, low=0)
    batch_size = _checks.integer("cross_validate.batch_size", batch_size, low=1)
    vmap = _checks.flag("cross_validate.vmap", vmap)
    stratified = _checks.flag("cross_validate.stratified", stratified)
    fold_key, init_key, shuffle_key = jax.random.split(key, 3)
    folds = list(kfold(len(ds), k, fold_key, labels=ds.y if stratified else None))
    steps = min(len(tr) for tr, _ in folds) // batch_size
    if steps < 1:
        raise ValueError(f"cross_validate.batch_size={batch_size} is larger than the smallest training fold")
    loss_fn = loss_fn or classifier_loss(apply_fn)

    def one_step(state, batch):
        grads, metrics, stats = grads_and_metrics(loss_fn, state, batch)
        return apply_gradients(tx, state, grads, stats), metrics

    def batch_indices(f: int, epoch_key: jax.Array) -> np.ndarray:
        order = np.asarray(jax.random.permutation(jax.random.fold_in(epoch_key, f), len(folds[f][0])))
        return folds[f][0][order[: steps * batch_size]].reshape(steps, batch_size)

    init_keys = jax.random.split(init_key, k)
    epoch_keys: jax.Array | list[jax.Array] = jax.random.split(shuffle_key, epochs) if epochs else []
    if vmap:
        state = jax.vmap(lambda kk: TrainState.create(init_fn(kk), tx))(init_keys)
        step = jax.jit(jax.vmap(one_step))
        for epoch_key in epoch_keys:
            idx = np.stack([batch_indices(f, epoch_key) for f in range(k)], 1)  # [steps, k, batch]
            for s in range(steps):
                state, _ = step(state, (ds.x[idx[s]], ds.y[idx[s]]))
        params = [jax.tree.map(operator.itemgetter(f), state.params) for f in range(k)]
    else:
        step = jax.jit(one_step)
        params = []
        for f in range(k):
            state = TrainState.create(init_fn(init_keys[f]), tx)
            for epoch_key in epoch_keys:
                for rows in batch_indices(f, epoch_key):
                    state, _ = step(state, (ds.x[rows], ds.y[rows]))
            params.append(state.params)
    return CrossValidation(tuple(evaluate(apply_fn, p, ds.take(test)) for p, (_, test) in zip(params, folds)))
