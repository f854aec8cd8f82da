"""Epoch loop: progress bar, periodic evaluation, callbacks, early stopping, LR on plateau, checkpoints."""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any, Callable, Sequence

import jax
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxopt_big import data as _data
from jaxopt_big.train._state import TrainState

__all__ = ["fit", "EarlyStopping", "ReduceOnPlateau", "Callback"]

Callback = Callable[[int, TrainState, dict[str, float]], Any]


def _check_mode(name: str, mode: str) -> None:
    if mode not in ("min", "max"):
        raise ValueError(f"{name}.mode must be 'min' or 'max', got {mode!r}")


def _improved(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


@dataclasses.dataclass(frozen=True, kw_only=True)
class EarlyStopping:
    """Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` evaluated epochs."""

    monitor: str = "val_loss"
    patience: int = 3
    min_delta: float = 0.0
    mode: str = "min"

    def __post_init__(self):
        _check_mode("EarlyStopping", self.mode)
        if not isinstance(self.patience, int) or self.patience < 1:
            raise ValueError(f"EarlyStopping.patience must be a positive int, got {self.patience!r}")
        if self.min_delta < 0:
            raise ValueError(f"EarlyStopping.min_delta must be >= 0, got {self.min_delta!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReduceOnPlateau:
    """Multiply the learning rate by ``factor`` after ``patience`` epochs without improvement.

    The optimizer must come from ``optax.inject_hyperparams`` with a ``learning_rate``: the rate is
    part of the optimizer state (a traced value), so changing it does not recompile the step.
    """

    monitor: str = "val_loss"
    factor: float = 0.5
    patience: int = 2
    min_delta: float = 0.0
    min_lr: float = 0.0
    mode: str = "min"

    def __post_init__(self):
        _check_mode("ReduceOnPlateau", self.mode)
        if not 0.0 < self.factor < 1.0:
            raise ValueError(f"ReduceOnPlateau.factor must be in (0, 1), got {self.factor!r}")
        if not isinstance(self.patience, int) or self.patience < 1:
            raise ValueError(f"ReduceOnPlateau.patience must be a positive int, got {self.patience!r}")


def _is_injected(x: Any) -> bool:
    return (isinstance(x, (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState))
            and "learning_rate" in x.hyperparams)


def _learning_rate(opt_state: Any) -> float | None:
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=_is_injected) if _is_injected(x)]
    return float(found[0].hyperparams["learning_rate"]) if found else None


def _scale_learning_rate(state: TrainState, factor: float, min_lr: float) -> TrainState:
    def scale(x):
        if not _is_injected(x):
            return x
        lr = x.hyperparams["learning_rate"]
        new = jax.numpy.maximum(lr * factor, min_lr).astype(lr.dtype)
        return x._replace(hyperparams={**x.hyperparams, "learning_rate": new})
    return state.replace(opt_state=jax.tree.map(scale, state.opt_state, is_leaf=_is_injected))


def _monitored(record: dict[str, float], name: str, who: str) -> float:
    if name not in record:
        raise ValueError(f"{who} monitors {name!r}, but the epoch record has only {sorted(record)} "
                         f"(validation metrics need eval_fn)")
    return record[name]


def _memory() -> dict[str, float]:
    stats = jax.local_devices()[0].memory_stats()  # None on backends that do not report (CPU)
    if not stats:
        return {}
    return {f"memory_{k}": float(stats[k]) for k in ("bytes_in_use", "peak_bytes_in_use") if k in stats}


def fit(step: Callable[[TrainState, Any], tuple[TrainState, dict]], state: TrainState, train: _data.Dataset,
        *, epochs: int, batch_size: int, key: jax.Array, progress: bool | None = None, desc: str = "train",
        eval_fn: Callable[[TrainState], dict[str, float]] | None = None, eval_every: int = 1,
        callbacks: Sequence[Callback] = (), early_stopping: EarlyStopping | None = None,
        plateau: ReduceOnPlateau | None = None, checkpoint: Any = None, checkpoint_every: int = 1
        ) -> tuple[TrainState, list[dict[str, float]]]:
    """Runs ``epochs`` shuffled epochs of ``step``; returns the state and one record per epoch.

    Batches are ``(x, y)`` tuples with a fixed size (the last partial batch is dropped), so the
    step compiles once. A record holds ``epoch``, the epoch's mean step metrics, ``val_*`` metrics
    from ``eval_fn(state)`` every ``eval_every`` epochs, ``lr`` when the optimizer injects its
    learning rate, and device memory statistics where the backend reports them.

    Args:
      step: from :func:`~jaxopt_big.train.make_step` (or any ``(state, batch) -> (state, metrics)``).
      state, train, epochs, batch_size: what to train, on what, how long.
      key: PRNG key; epoch ``e`` shuffles with ``jax.random.split(key, epochs)[e]``.
      progress: tqdm bar; by default only when stderr is a terminal.
      eval_fn, eval_every: periodic evaluation, reported with a ``val_`` prefix.
      callbacks: ``callback(epoch, state, record)`` after each epoch; returning True stops training.
      early_stopping: stop when the monitored record value stops improving.
      plateau: reduce the learning rate when the monitored value stops improving.
      checkpoint: a :class:`jaxopt_big.checkpoint.Manager`. Every ``checkpoint_every`` epochs (and
        at the end) the state is saved with the history; if the manager already holds a
        checkpoint, training resumes from it, so a rerun after a crash continues exactly.

    Examples:
      >>> import optax, jax.numpy as jnp
      >>> from jaxopt_big.train._step import make_step, classifier_loss
      >>> ds = _data.Dataset(np.eye(4, dtype=np.float32), np.arange(4) % 2)
      >>> tx = optax.sgd(0.5)
      >>> step = make_step(classifier_loss(lambda p, x: x @ p), tx)
      >>> state, history = fit(step, TrainState.create(jnp.zeros((4, 2)), tx), ds, epochs=3,
      ...                      batch_size=2, key=jax.random.key(0), progress=False)
      >>> len(history), history[-1]["loss"] < history[0]["loss"]
      (3, True)
    """
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative int, got {epochs!r}")
    if not isinstance(eval_every, int) or eval_every < 1 or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"eval_every and checkpoint_every must be positive ints, got {eval_every!r}, "
                         f"{checkpoint_every!r}")
    if len(train) < batch_size:
        raise ValueError(f"batch_size={batch_size} is larger than the training set ({len(train)} examples)")
    if plateau is not None and _learning_rate(state.opt_state) is None:
        raise ValueError("plateau needs an optimizer from optax.inject_hyperparams(...)(learning_rate=...), "
                         "whose learning rate lives in the optimizer state")
    history: list[dict[str, float]] = []
    # best value and epochs without improvement, for early stopping and the plateau rule
    watch: dict[str, Any] = {"early": [None, 0], "plateau": [None, 0]}
    start = 0
    if checkpoint is not None and checkpoint.latest_step() is not None:
        from jaxopt_big import checkpoint as _checkpoint  # checkpoint knows nothing of train

        state = checkpoint.restore(like=_checkpoint.abstract(state))
        extra = checkpoint.extra()
        history, watch, start = list(extra["history"]), extra["watch"], int(extra["epoch"])

    def save(epoch: int) -> None:
        checkpoint.save(int(state.step), state, extra={"epoch": epoch, "history": history, "watch": watch},
                        force=True)

    progress = sys.stderr.isatty() if progress is None else progress
    steps_per_epoch = len(train) // batch_size
    bar = tqdm(total=(epochs - start) * steps_per_epoch, desc=desc, disable=not progress, leave=False)
    epoch_keys = jax.random.split(key, epochs) if epochs else []
    epoch = start
    for epoch in range(start, epochs):
        sums: dict[str, Any] = {}  # device arrays: no host sync inside the epoch
        for batch in _data.batches(train, batch_size, key=epoch_keys[epoch], drop_remainder=True):
            state, metrics = step(state, (batch.x, batch.y))
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.update(1)
        record = {"epoch": epoch + 1, **{k: float(v) / steps_per_epoch for k, v in sums.items()}}
        if eval_fn is not None and (epoch + 1) % eval_every == 0:
            record.update({f"val_{k}": float(v) for k, v in eval_fn(state).items()})
        lr = _learning_rate(state.opt_state)
        if lr is not None:
            record["lr"] = lr
        record.update(_memory())
        history.append(record)
        bar.set_postfix(loss=f"{record.get('loss', math.nan):.4f}")

        stop = False
        if plateau is not None and plateau.monitor in record:
            best, wait = watch["plateau"]
            value = _monitored(record, plateau.monitor, "ReduceOnPlateau")
            if _improved(value, best, plateau.mode, plateau.min_delta):
                watch["plateau"] = [value, 0]
            elif wait + 1 >= plateau.patience:
                state = _scale_learning_rate(state, plateau.factor, plateau.min_lr)
                watch["plateau"] = [best, 0]
            else:
                watch["plateau"] = [best, wait + 1]
        elif plateau is not None and eval_fn is None:
            _monitored(record, plateau.monitor, "ReduceOnPlateau")
        if early_stopping is not None and (early_stopping.monitor in record or eval_fn is None):
            best, wait = watch["early"]
            value = _monitored(record, early_stopping.monitor, "EarlyStopping")
            if _improved(value, best, early_stopping.mode, early_stopping.min_delta):
                watch["early"] = [value, 0]
            else:
                watch["early"] = [best, wait + 1]
                stop = wait + 1 >= early_stopping.patience
        for callback in callbacks:
            stop = bool(callback(epoch + 1, state, record)) or stop
        if checkpoint is not None and ((epoch + 1) % checkpoint_every == 0 or stop or epoch + 1 == epochs):
            save(epoch + 1)
        if stop:
            break
    bar.close()
    if checkpoint is not None:
        checkpoint.wait()
    return state, history
