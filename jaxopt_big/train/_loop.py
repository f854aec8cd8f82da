"""Epoch loop: progress bar, periodic evaluation, callbacks (early stopping, LR on plateau), checkpoints."""

from __future__ import annotations

import dataclasses
import math
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from tqdm.auto import tqdm

from jaxopt_big import _checks
from jaxopt_big import data as _data
from jaxopt_big.train._evaluation import check_dataset
from jaxopt_big.train._state import TrainState

__all__ = ["fit", "Callback", "EpochEnd", "EarlyStopping", "ReduceOnPlateau"]


@dataclasses.dataclass(frozen=True)
class EpochEnd:
    """What a callback sees after an epoch: its number (from 1), the state, the epoch's record and
    whether ``eval_fn`` ran this epoch (so ``val_*`` values are in the record)."""

    epoch: int
    state: TrainState
    record: dict[str, float]
    evaluated: bool


class Callback:
    """Base of :func:`fit`'s callbacks: override ``init`` and ``on_epoch_end``.

    A callback keeps no state of its own: ``init`` returns its memory (JSON-serializable, so a
    checkpoint saves it and a resumed run continues exactly), and ``on_epoch_end`` gets the memory
    back and returns ``(state, memory, stop)``: it may replace the state (a new learning rate) and
    stop training. A plain function ``callback(epoch, state, record) -> bool`` (True stops) is
    accepted wherever a callback is.

    Examples:
      >>> class StopBelow(Callback):
      ...     def on_epoch_end(self, end, memory):
      ...         return end.state, memory, end.record["loss"] < 0.1
    """

    def init(self, state: TrainState, *, evaluates: bool) -> Any:
        """Checks the callback fits this run (``evaluates``: fit has an ``eval_fn``); returns its memory."""
        return None

    def on_epoch_end(self, end: EpochEnd, memory: Any) -> tuple[TrainState, Any, bool]:
        return end.state, memory, False


@dataclasses.dataclass(frozen=True)
class _Function(Callback):
    fn: Callable[[int, TrainState, dict[str, float]], Any]

    def on_epoch_end(self, end: EpochEnd, memory: Any) -> tuple[TrainState, Any, bool]:
        return end.state, memory, bool(self.fn(end.epoch, end.state, end.record))


def _check_mode(name: str, mode: str) -> None:
    if mode not in ("min", "max"):
        raise ValueError(f"{name}.mode must be 'min' or 'max', got {mode!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Monitor(Callback):
    """Tracks the best value of ``monitor`` and the evaluated epochs since it last improved.

    Memory: ``[best, wait]``. Epochs whose record lacks a ``val_*`` monitor because ``eval_fn``
    did not run (``eval_every``) are skipped; any other missing value raises.
    """

    monitor: str = "val_loss"
    patience: int = 3
    min_delta: float = 0.0
    mode: str = "min"

    def __post_init__(self):
        name = type(self).__name__
        if not isinstance(self.monitor, str):
            raise TypeError(f"{name}.monitor must be a metric name (str), got {self.monitor!r}")
        _check_mode(name, self.mode)
        _checks.store(self, patience=_checks.integer(f"{name}.patience", self.patience, low=1),
                      min_delta=_checks.number(f"{name}.min_delta", self.min_delta, low=0))

    def init(self, state: TrainState, *, evaluates: bool) -> Any:
        if self.monitor.startswith("val_") and not evaluates:
            raise ValueError(f"{type(self).__name__} monitors {self.monitor!r}, a validation metric, "
                             f"but fit has no eval_fn")
        return [None, 0]

    def _update(self, end: EpochEnd, memory: Any) -> tuple[Any, bool]:
        """(new memory, patience ran out); memory unchanged on an epoch without the value."""
        if self.monitor not in end.record:
            if self.monitor.startswith("val_") and not end.evaluated:
                return memory, False
            raise ValueError(f"{type(self).__name__} monitors {self.monitor!r}, but the epoch record has only "
                             f"{sorted(end.record)}")
        value, (best, wait) = end.record[self.monitor], memory
        if best is None or (value < best - self.min_delta if self.mode == "min" else value > best + self.min_delta):
            return [value, 0], False
        return [best, wait + 1], wait + 1 >= self.patience


@dataclasses.dataclass(frozen=True, kw_only=True)
class EarlyStopping(_Monitor):
    """Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` evaluated epochs.

    Examples:
      >>> EarlyStopping(monitor="val_accuracy", mode="max", patience=5).patience
      5
    """

    def on_epoch_end(self, end: EpochEnd, memory: Any) -> tuple[TrainState, Any, bool]:
        memory, out_of_patience = self._update(end, memory)
        return end.state, memory, out_of_patience


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReduceOnPlateau(_Monitor):
    """Multiply the learning rate by ``factor`` after ``patience`` epochs without improvement.

    The optimizer must come from ``optax.inject_hyperparams`` with a ``learning_rate``: the rate is
    part of the optimizer state (a traced value), so changing it does not recompile the step.

    Examples:
      >>> ReduceOnPlateau(factor=0.1, patience=2).factor
      0.1
    """

    patience: int = 2
    factor: float = 0.5
    min_lr: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        _checks.store(self, factor=_checks.fraction("ReduceOnPlateau.factor", self.factor, open_low=True),
                      min_lr=_checks.number("ReduceOnPlateau.min_lr", self.min_lr, low=0))

    def init(self, state: TrainState, *, evaluates: bool) -> Any:
        if _learning_rate(state.opt_state) is None:
            raise ValueError("ReduceOnPlateau needs an optimizer from optax.inject_hyperparams(...)"
                             "(learning_rate=...), whose learning rate lives in the optimizer state")
        return super().init(state, evaluates=evaluates)

    def on_epoch_end(self, end: EpochEnd, memory: Any) -> tuple[TrainState, Any, bool]:
        memory, out_of_patience = self._update(end, memory)
        if not out_of_patience:
            return end.state, memory, False
        return _scale_learning_rate(end.state, self.factor, self.min_lr), [memory[0], 0], False


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
        new = jnp.maximum(lr * factor, min_lr).astype(lr.dtype)
        return x._replace(hyperparams={**x.hyperparams, "learning_rate": new})
    return dataclasses.replace(state, opt_state=jax.tree.map(scale, state.opt_state, is_leaf=_is_injected))


def _memory() -> dict[str, float]:
    stats = jax.local_devices()[0].memory_stats()  # None on backends that do not report (CPU)
    if not stats:
        return {}
    return {f"memory_{k}": float(stats[k]) for k in ("bytes_in_use", "peak_bytes_in_use") if k in stats}


def _as_callbacks(callbacks: Sequence[Any], early_stopping: Any, plateau: Any) -> list[Callback]:
    """Callbacks in call order; the old ``plateau=`` / ``early_stopping=`` arguments go first."""
    old = [c for c in (plateau, early_stopping) if c is not None]
    if old:
        warnings.warn("fit(plateau=..., early_stopping=...) is deprecated: pass them in callbacks=[...]",
                      DeprecationWarning, stacklevel=3)
    out = []
    for c in [*old, *callbacks]:
        if not isinstance(c, Callback) and not callable(c):
            raise TypeError(f"a callback is a Callback or a function (epoch, state, record) -> bool, got {c!r}")
        out.append(c if isinstance(c, Callback) else _Function(c))
    return out


def _epoch_means(metrics: list[dict[str, jax.Array]]) -> dict[str, float]:
    """The epoch's mean step metrics, read from the device once (no per-step host sync or op)."""
    means = jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs)), *metrics) if metrics else {}
    return {k: float(v) for k, v in jax.device_get(means).items()}


def fit(step: Callable[[TrainState, Any], tuple[TrainState, dict]], state: TrainState, train: _data.Dataset,
        *, epochs: int, batch_size: int, key: jax.Array, progress: bool | None = None, desc: str = "train",
        eval_fn: Callable[[TrainState], dict[str, float]] | None = None, eval_every: int = 1,
        callbacks: Sequence[Callback | Callable[[int, TrainState, dict[str, float]], Any]] = (),
        checkpoint: Any = None, checkpoint_every: int = 1, early_stopping: EarlyStopping | None = None,
        plateau: ReduceOnPlateau | None = None) -> tuple[TrainState, list[dict[str, float]]]:
    """Runs ``epochs`` shuffled epochs of ``step``; returns the state and one record per epoch.

    Batches are ``(x, y)`` tuples with a fixed size (the last partial batch is dropped), so the
    step compiles once. A record holds ``epoch``, the epoch's mean step metrics, ``val_*`` metrics
    from ``eval_fn(state)`` every ``eval_every`` epochs, ``lr`` when the optimizer injects its
    learning rate, and device memory statistics where the backend reports them. Within an epoch
    the loop only slices batches and calls ``step``: metrics stay on the device and are read once
    at the epoch's end, so the host runs ahead of the device as in a hand-written loop.

    Args:
      step: from :func:`~jaxopt_big.train.make_step` (or any ``(state, batch) -> (state, metrics)``).
      state, train, epochs, batch_size: what to train, on what (a :class:`jaxopt_big.data.Dataset`),
        how long.
      key: PRNG key; epoch ``e`` shuffles with ``jax.random.split(key, epochs)[e]``.
      progress: tqdm bar; by default only when stderr is a terminal.
      eval_fn, eval_every: periodic evaluation, reported with a ``val_`` prefix.
      callbacks: :class:`Callback` objects (such as :class:`EarlyStopping` and
        :class:`ReduceOnPlateau`) or functions ``callback(epoch, state, record) -> bool``, called in
        order after each epoch; one that asks to stop ends training after this epoch.
      checkpoint: a :class:`jaxopt_big.checkpoint.Manager`. Every ``checkpoint_every`` epochs (and
        at the end) the state is saved with the history and the callbacks' memory; if the manager
        already holds a checkpoint, training resumes from it, so a rerun after a crash continues exactly.
      early_stopping, plateau: deprecated; pass them in ``callbacks``.

    Examples:
      >>> import numpy as np, optax, jax.numpy as jnp
      >>> from jaxopt_big.train._step import make_step, classifier_loss
      >>> ds = _data.Dataset(np.eye(4, dtype=np.float32), np.arange(4) % 2)
      >>> tx = optax.sgd(0.5)
      >>> step = make_step(classifier_loss(lambda p, x: x @ p), tx)
      >>> state, history = fit(step, TrainState.create(jnp.zeros((4, 2)), tx), ds, epochs=3, batch_size=2,
      ...                      key=jax.random.key(0), progress=False, callbacks=[EarlyStopping(monitor="loss")])
      >>> len(history), history[-1]["loss"] < history[0]["loss"]
      (3, True)
    """
    check_dataset("fit.train", train)
    epochs = _checks.integer("fit.epochs", epochs, low=0)
    batch_size = _checks.integer("fit.batch_size", batch_size, low=1)
    eval_every = _checks.integer("fit.eval_every", eval_every, low=1)
    checkpoint_every = _checks.integer("fit.checkpoint_every", checkpoint_every, low=1)
    if progress is not None:
        progress = _checks.flag("fit.progress", progress)
    if len(train) < batch_size:
        raise ValueError(f"fit.batch_size={batch_size} is larger than the training set ({len(train)} examples)")
    callbacks = _as_callbacks(callbacks, early_stopping, plateau)
    memories = [c.init(state, evaluates=eval_fn is not None) for c in callbacks]
    history: list[dict[str, float]] = []
    start = 0
    if checkpoint is not None and checkpoint.latest_step() is not None:
        from jaxopt_big import checkpoint as _checkpoint  # checkpoint knows nothing of train

        state = checkpoint.restore(like=_checkpoint.abstract(state))
        extra = checkpoint.extra()
        history, memories, start = list(extra["history"]), list(extra["callbacks"]), int(extra["epoch"])
        if len(memories) != len(callbacks):
            raise ValueError(f"the checkpoint holds the memory of {len(memories)} callbacks, this run has "
                             f"{len(callbacks)}: resume with the same callbacks")

    progress = sys.stderr.isatty() if progress is None else progress
    steps_per_epoch = len(train) // batch_size
    bar = tqdm(total=(epochs - start) * steps_per_epoch, desc=desc, disable=not progress, leave=False)
    epoch_keys: jax.Array | list[jax.Array] = jax.random.split(key, epochs) if epochs else []
    for epoch in range(start + 1, epochs + 1):
        metrics = []  # device arrays: read once, at the end of the epoch
        for batch in _data.batches(train, batch_size, key=epoch_keys[epoch - 1], drop_remainder=True):
            state, m = step(state, (batch.x, batch.y))
            metrics.append(m)
            bar.update(1)
        record = {"epoch": epoch, **_epoch_means(metrics)}
        evaluated = False
        if eval_fn is not None and epoch % eval_every == 0:
            record.update({f"val_{k}": float(v) for k, v in eval_fn(state).items()})
            evaluated = True
        lr = _learning_rate(state.opt_state)
        if lr is not None:
            record["lr"] = lr
        record.update(_memory())
        history.append(record)
        bar.set_postfix(loss=f"{record.get('loss', math.nan):.4f}")

        stop = False
        for i, callback in enumerate(callbacks):
            state, memories[i], asked = callback.on_epoch_end(EpochEnd(epoch, state, record, evaluated), memories[i])
            stop = stop or asked
        if checkpoint is not None and (epoch % checkpoint_every == 0 or stop or epoch == epochs):
            checkpoint.save(int(state.step), state, extra={"epoch": epoch, "history": history, "callbacks": memories},
                            force=True)
        if stop:
            break
    bar.close()
    if checkpoint is not None:
        checkpoint.wait()
    return state, history
