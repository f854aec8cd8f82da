"""Evaluation of a classifier over a dataset."""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
import optax

from jaxopt_big import data as _data

__all__ = ["evaluate"]


def evaluate(apply_fn: Callable[[Any, jax.Array], jax.Array], params: Any, ds: _data.Dataset,
             *, batch_size: int = 512) -> dict[str, float]:
    """Mean softmax cross-entropy and accuracy of ``apply_fn(params, x)`` logits over ``ds``.

    Examples:
      >>> import jax.numpy as jnp
      >>> ds = _data.Dataset(np.eye(2, dtype=np.float32), np.array([0, 1]))
      >>> evaluate(lambda p, x: x @ p, jnp.eye(2) * 10, ds)["accuracy"]
      1.0
    """
    forward = jax.jit(lambda p, x, y: (optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, x), y).sum(),
                                       (apply_fn(p, x).argmax(-1) == y).sum()))
    loss = correct = 0.0
    for batch in _data.batches(ds, batch_size):
        l, c = forward(params, batch.x, batch.y)
        loss, correct = loss + float(l), correct + float(c)
    return {"loss": loss / len(ds), "accuracy": correct / len(ds)}
