"""Epoch loop over a dataset with a progress bar."""

from __future__ import annotations

import sys
from typing import Any, Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxopt_big import data as _data
from jaxopt_big.train.state import TrainState

__all__ = ["fit"]


def fit(step: Callable[[TrainState, Any], tuple[TrainState, dict]], state: TrainState, train: _data.Dataset,
        *, epochs: int, batch_size: int, key: jax.Array, progress: bool | None = None,
        desc: str = "train") -> tuple[TrainState, list[dict[str, float]]]:
    """Runs ``epochs`` shuffled epochs of ``step``; returns the state and per-epoch mean metrics.

    Batches are ``(x, y)`` tuples with a fixed size (the last partial batch is dropped), so the
    step compiles once. The progress bar shows when stderr is a terminal or ``progress=True``.

    Examples:
      >>> import optax, jax.numpy as jnp
      >>> from jaxopt_big.train.step import make_step, classifier_loss
      >>> ds = _data.Dataset(np.eye(4, dtype=np.float32), np.arange(4) % 2)
      >>> tx = optax.sgd(0.5)
      >>> step = make_step(classifier_loss(lambda p, x: x @ p), tx)
      >>> state, history = fit(step, TrainState.create(jnp.zeros((4, 2)), tx), ds, epochs=3,
      ...                      batch_size=2, key=jax.random.key(0), progress=False)
      >>> len(history), history[-1]["loss"] < history[0]["loss"]
      (3, True)
    """
    progress = sys.stderr.isatty() if progress is None else progress
    history = []
    bar = tqdm(total=epochs * (len(train) // batch_size), desc=desc, disable=not progress, leave=False)
    for epoch_key in jax.random.split(key, epochs):
        sums: dict[str, Any] = {}  # device arrays: no host sync inside the epoch
        n = 0
        for batch in _data.batches(train, batch_size, key=epoch_key, drop_remainder=True):
            state, metrics = step(state, (batch.x, batch.y))
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
            bar.update(1)
        history.append({k: float(v) / max(n, 1) for k, v in sums.items()})
        bar.set_postfix(loss=f"{history[-1].get('loss', np.nan):.4f}")
    bar.close()
    return state, history
