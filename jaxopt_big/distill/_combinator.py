"""Distillation as a loss combinator: task loss + KD on logits + hint losses on captured intermediates.

:func:`combine` turns a task loss, a student and a teacher into ``loss_fn(params, batch) ->
(loss, aux)``, the signature :func:`jaxopt_big.train.make_step` trains. Intermediates are read with
:func:`jaxopt_big.intercept.capture` (linen and nnx) and resolved with :func:`jaxopt_big.tree.select`;
there is no other capture mechanism.
"""

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxopt_big import _checks
from jaxopt_big import intercept as _intercept
from jaxopt_big import tree as _tree
from jaxopt_big.distill._losses import FeatureLoss, feature_loss, kd_loss

__all__ = ["Feature", "NnxApply", "TeacherTargets", "Batch", "precompute", "combine"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Feature:
    """One student/teacher pair of intermediates compared by a hint loss.

    Attributes:
      student: regex (full match) on the student's module path of a Dense/Conv/Einsum layer,
        e.g. ``"Dense_0"`` (linen) or ``"layers/0"`` (nnx); it must match exactly one layer call.
      teacher: the same for the teacher. The compared values are the layers' *outputs*.
      kind: the :class:`FeatureLoss`.
      weight: factor of this term in the total loss (>= 0).
      projection: ``params -> init_projection(...) params``: where the learnable projection
        lives in the trained parameter pytree (for example ``lambda p: p["proj"]``); ``None``
        when the widths already agree.
      name: the aux key suffix (``aux["feature/<name>"]``); default ``"<student>-><teacher>"``.

    Examples:
      >>> Feature(student="Dense_0", teacher="Dense_1").name
      'Dense_0->Dense_1'
    """

    student: str
    teacher: str
    kind: FeatureLoss = FeatureLoss.MSE
    weight: float = 1.0
    projection: Callable[[Any], dict[str, jax.Array]] | None = None
    name: str = ""

    def __post_init__(self):
        if not self.name:
            _checks.store(self, name=f"{self.student}->{self.teacher}")
        for side in ("student", "teacher"):
            if not isinstance(getattr(self, side), str):
                raise TypeError(f"Feature.{side} must be a module-path regex str, got {getattr(self, side)!r}")
            _tree.compile_pattern(getattr(self, side), what=f"Feature.{side}")
        if not isinstance(self.kind, FeatureLoss):
            raise TypeError(f"Feature.kind must be a FeatureLoss, got {self.kind!r}")
        _checks.number("Feature.weight", self.weight, low=0)
        if self.projection is not None and not callable(self.projection):
            raise TypeError(f"Feature.projection must be a callable params -> projection, got {self.projection!r}")


@dataclasses.dataclass(frozen=True)
class NnxApply:
    """An nnx student as ``apply(params, x)``: merges ``graphdef`` with the trained ``nnx.State``.

    ``part`` picks that state out of the trained pytree when it holds more (e.g. projections).

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> graphdef, state = nnx.split(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
      >>> NnxApply(graphdef)(state, jnp.ones((4, 3))).shape
      (4, 2)
    """

    graphdef: Any
    part: Callable[[Any], Any] | None = None

    def module(self, params: Any) -> nnx.Module:
        return nnx.merge(self.graphdef, params if self.part is None else self.part(params))

    def __call__(self, params: Any, x: Any) -> jax.Array:
        return self.module(params)(x)


class TeacherTargets(NamedTuple):
    """What the teacher provides: logits ``(N, classes)`` and outputs keyed by ``Feature.teacher``."""

    logits: Any
    features: Mapping[str, Any] | None = None


class Batch(NamedTuple):
    """The batch layout :func:`combine`'s ``loss_fn`` reads (a plain ``(x, y)`` tuple also works).

    Attributes:
      x: the inputs, passed to both ``student(params, x)`` and ``teacher(x)``.
      y: the labels, passed to ``task_loss(logits, y)``; unlabeled rows may hold any value.
      labeled: optional ``(N,)`` mask of rows whose label counts (transfer sets: KD on every row,
        the task loss on labeled rows only).
      mask: optional ``(N,)`` mask of real rows (padding excluded from every term).
      teacher: cached :class:`TeacherTargets` for these rows (see :func:`precompute`); read when
        ``combine(..., teacher=None)``.
    """

    x: Any
    y: Any
    labeled: Any = None
    mask: Any = None
    teacher: TeacherTargets | None = None


def _as_batch(batch: Any) -> Batch:
    if isinstance(batch, Batch):
        return batch
    try:
        return Batch(**batch) if isinstance(batch, Mapping) else Batch(*batch)
    except TypeError:
        raise ValueError(f"a distillation batch is a Batch, a mapping or a tuple with fields {Batch._fields}; "
                         f"got {type(batch).__name__} with "
                         f"{list(batch) if isinstance(batch, Mapping) else len(batch)} entries") from None


def _pick(records: dict[str, _intercept.Record], pattern: str, who: str) -> jax.Array:
    """The output of the one captured layer whose path fully matches ``pattern``."""
    outputs = {path: rec.outputs for path, rec in records.items()}
    hits = [p for p, hit in _tree.select(outputs, pattern).items() if hit]
    if len(hits) != 1:
        raise ValueError(f"{who} feature pattern {pattern!r} must match exactly one captured layer, "
                         f"matched {hits}; captured: {sorted(outputs)}")
    return outputs[hits[0]]


def _run_teacher(teacher: Callable, x: Any, features: Sequence[Feature]) -> TeacherTargets:
    if not features:
        return TeacherTargets(teacher(x), {})
    logits, records = _intercept.capture(teacher, [f.teacher for f in features])(x)
    return TeacherTargets(logits, {f.teacher: _pick(records, f.teacher, "teacher") for f in features})


def precompute(teacher: Callable[[Any], jax.Array], x: Any, *, features: Sequence[Feature] = (),
               batch_size: int = 512) -> TeacherTargets:
    """Runs the teacher once over ``x`` so training steps can skip its forward pass.

    Args:
      teacher: ``x -> logits`` (a function calling linen modules, or an nnx module).
      x: all inputs, ``(N, ...)``; processed in chunks of ``batch_size`` under ``jax.jit``.
      features: the :class:`Feature` pairs whose teacher outputs to keep as well.

    Returns:
      :class:`TeacherTargets` of host numpy arrays, to be sliced row-wise into :class:`Batch`
      ``teacher=`` fields.

    Examples:
      >>> import jax.numpy as jnp
      >>> targets = precompute(lambda x: 2 * x, jnp.ones((5, 3)), batch_size=2)
      >>> targets.logits.shape, float(targets.logits[0, 0])
      ((5, 3), 2.0)
    """
    _checks.integer("batch_size", batch_size, low=1)
    run = jax.jit(lambda xb: _run_teacher(teacher, xb, features))
    chunks = [run(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    return jax.tree.map(lambda *parts: np.concatenate([np.asarray(p) for p in parts]), *chunks)


def combine(task_loss: Callable[[jax.Array, Any], jax.Array], teacher: Callable[[Any], jax.Array] | None, *,
            student: Callable[[Any, Any], jax.Array], alpha: float, temperature: float,
            features: Sequence[Feature] = ()) -> Callable[[Any, Any], tuple[jax.Array, dict[str, jax.Array]]]:
    """A distillation ``loss_fn(params, batch) -> (loss, aux)`` for :func:`jaxopt_big.train.make_step`.

    ``loss = alpha * task + (1 - alpha) * kd + sum(f.weight * feature_f)`` where

    - ``task`` is the mean of ``task_loss(logits, y)`` over labeled, unmasked rows (0 if none);
    - ``kd`` is :func:`kd_loss` of the student and teacher logits at ``temperature``;
    - ``feature_f`` is :func:`feature_loss` between the outputs of the layers the feature's
      patterns select (student side projected by ``f.projection(params)`` when given).

    With ``alpha=1`` and no features the loss *is* the task loss (bit for bit); ``aux`` holds
    ``task``, ``kd``, ``feature/<name>`` for each feature and, for integer labels, ``accuracy``
    on the labeled rows.

    Args:
      task_loss: ``(student_logits, y) -> per-row losses`` of shape ``logits.shape[:-1]``, e.g.
        ``optax.softmax_cross_entropy_with_integer_labels``.
      teacher: ``x -> teacher logits``, run inside the step under ``stop_gradient`` (a function
        closing over the teacher's params that calls linen modules, or an nnx module); or
        ``None`` to read cached logits (and features) from ``batch.teacher`` (see :func:`precompute`),
        which skips the teacher's forward pass.
      student: ``(params, x) -> logits``, e.g. ``lambda p, x: model.apply({"params": p}, x)`` for
        linen or :class:`NnxApply` for nnx; ``params`` is the whole trained pytree.
      alpha: weight of the task loss, in [0, 1].
      temperature: KD temperature, > 0.
      features: :class:`Feature` pairs for hint losses.

    Returns:
      ``loss_fn(params, batch)``; ``batch`` is a :class:`Batch`, a mapping with its field names,
      or a tuple ``(x, y[, labeled, mask, teacher])``.

    Raises:
      ValueError: alpha outside [0, 1] or temperature <= 0 (here); at trace time, mismatched
        logits shapes, a feature pattern that matches no captured layer (the message lists the
        captured names) or a missing cached teacher.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> w_teacher = jnp.eye(3) * 3.0
      >>> loss_fn = combine(optax.softmax_cross_entropy_with_integer_labels, lambda x: x @ w_teacher,
      ...                   student=lambda p, x: x @ p, alpha=0.5, temperature=2.0)
      >>> loss, aux = loss_fn(jnp.eye(3), (jnp.eye(3), jnp.arange(3)))
      >>> sorted(aux), bool(loss > 0)
      (['accuracy', 'kd', 'task'], True)
    """
    _checks.number("alpha", alpha, low=0, high=1)
    _checks.number("temperature", temperature, above=0, traced=True)
    features = tuple(features)
    for f in features:
        if not isinstance(f, Feature):
            raise TypeError(f"features must hold Feature pairs, got {f!r}")
    names = [f.name for f in features]
    if len(set(names)) != len(names):
        raise ValueError(f"feature names must be unique (they key aux), got {names}; set Feature(name=...)")
    if not callable(student):
        raise TypeError(f"student must be a callable (params, x) -> logits, got {student!r}")
    if teacher is not None and not callable(teacher):
        raise TypeError(f"teacher must be a callable x -> logits or None (cached), got {teacher!r}")

    def run_student(params, x):
        if not features:
            return student(params, x), {}
        where = [f.student for f in features]
        if isinstance(student, NnxApply):
            logits, records = _intercept.capture(student.module(params), where)(x)
        else:
            logits, records = _intercept.capture(student, where)(params, x)
        return logits, {f.student: _pick(records, f.student, "student") for f in features}

    def teacher_targets(b: Batch) -> TeacherTargets:
        if teacher is not None:
            return jax.lax.stop_gradient(_run_teacher(teacher, b.x, features))
        if b.teacher is None:
            raise ValueError("combine(teacher=None) reads cached teacher logits from batch.teacher, "
                             "but this batch has none (see distill.precompute)")
        cached = dict(b.teacher.features or {})
        for f in features:
            if f.teacher not in cached:
                raise ValueError(f"cached teacher features lack {f.teacher!r}; cached: {sorted(cached)}")
        return b.teacher

    def loss_fn(params: Any, batch: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
        b = _as_batch(batch)
        logits, student_feats = run_student(params, b.x)
        targets = teacher_targets(b)
        kd = kd_loss(logits, targets.logits, temperature, mask=b.mask)

        per_row = task_loss(logits, b.y)
        if per_row.shape != logits.shape[:-1]:
            raise ValueError(f"task_loss must return per-row losses of shape {logits.shape[:-1]}, "
                             f"got {per_row.shape}")
        weight = jnp.ones(per_row.shape, per_row.dtype)
        for m in (b.labeled, b.mask):
            weight = weight if m is None else weight * jnp.asarray(m, per_row.dtype)
        if b.labeled is None and b.mask is None:
            task = per_row.mean()  # the task loss exactly as the caller would compute it
        else:
            task = (per_row * weight).sum() / jnp.maximum(weight.sum(), 1.0)

        loss = alpha * task + (1.0 - alpha) * kd
        aux = {"task": task, "kd": kd}
        teacher_feats = targets.features or {}  # teacher_targets checked it holds every feature
        for f in features:
            proj = None if f.projection is None else f.projection(params)
            value = feature_loss(student_feats[f.student], teacher_feats[f.teacher], kind=f.kind,
                                 projection=proj, mask=b.mask)
            loss = loss + f.weight * value
            aux[f"feature/{f.name}"] = value
        y = jnp.asarray(b.y)
        if jnp.issubdtype(y.dtype, jnp.integer) and y.shape == logits.shape[:-1]:
            hits = (logits.argmax(-1) == y).astype(jnp.float32)
            aux["accuracy"] = (hits * weight).sum() / jnp.maximum(weight.sum(), 1.0)
        return loss, aux

    return loss_fn
