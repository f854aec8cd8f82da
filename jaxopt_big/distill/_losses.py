"""Distillation losses: temperature-scaled KL on logits, feature (hint) losses, attention transfer.

Every loss is a mean over *rows* (all leading axes of the logits, the batch axis of feature maps),
optionally restricted by a ``mask`` of valid rows (padding), and puts the teacher under
``jax.lax.stop_gradient``, so only the student (and a projection) receives gradients.
"""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxopt_big import _checks

__all__ = ["FeatureLoss", "kd_loss", "feature_loss", "attention_transfer", "init_projection"]


class FeatureLoss(enum.Enum):
    """How :func:`feature_loss` compares a student and a teacher feature.

    MSE: mean squared difference over all elements of a row.
    COSINE: ``1 - cos`` between the feature vectors along the last (channel) axis, averaged over
      positions (for ``(N, D)`` features that is one vector per row).
    ATTENTION: :func:`attention_transfer` on ``(N, ..., C)`` feature maps (channels may differ).
    """

    MSE = "mse"
    COSINE = "cosine"
    ATTENTION = "attention"


def _masked_mean(rows: jax.Array, mask: ArrayLike | None) -> jax.Array:
    """Mean of per-row values; with ``mask``, over the rows where it is nonzero (0 if none)."""
    if mask is None:
        return rows.mean()
    mask = jnp.asarray(mask)
    if mask.shape != rows.shape:
        raise ValueError(f"mask has shape {mask.shape}, expected the row shape {rows.shape}")
    mask = mask.astype(rows.dtype)
    return (rows * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def kd_loss(student_logits: ArrayLike, teacher_logits: ArrayLike, temperature: float | ArrayLike,
            *, mask: ArrayLike | None = None) -> jax.Array:
    """Hinton's distillation loss ``T² · KL(softmax(t/T) ‖ softmax(s/T))``, mean over rows.

    Computed with log-softmax, so large logits do not overflow. The ``T²`` factor keeps the
    gradient scale independent of ``T``: the gradient w.r.t. the student logits is
    ``T · (softmax(s/T) − softmax(t/T)) / rows``. The teacher is under ``stop_gradient``.

    Args:
      student_logits: ``(..., classes)``; all leading axes are rows.
      teacher_logits: same shape as ``student_logits``.
      temperature: ``T > 0`` (a Python number is checked here; a traced value is used as is).
      mask: optional ``(...)`` row mask (nonzero = real row); the mean runs over masked rows only.

    Returns:
      A scalar.

    Raises:
      ValueError: shapes differ, the logits have no class axis, or ``temperature <= 0``.

    Examples:
      >>> import jax.numpy as jnp
      >>> s = jnp.array([[1.0, 2.0, 3.0]])
      >>> float(kd_loss(s, s, 2.0))
      0.0
      >>> round(float(kd_loss(jnp.zeros((1, 2)), jnp.array([[0.0, 4.0]]), 2.0)), 4)
      1.3113
    """
    s, t = jnp.asarray(student_logits), jnp.asarray(teacher_logits)
    if s.shape != t.shape or s.ndim < 1:
        raise ValueError(f"student logits {s.shape} and teacher logits {t.shape} must have the same "
                         "shape (..., classes)")
    _checks.number("temperature", temperature, above=0, traced=True)  # traced (a schedule): used as is
    # bf16/f16 logits: the softmaxes and the sum over classes lose ~3% in half precision
    s, t = (a.astype(jnp.promote_types(a.dtype, jnp.float32)) for a in (s, t))
    log_p_s = jax.nn.log_softmax(s / temperature, axis=-1)
    log_p_t = jax.nn.log_softmax(jax.lax.stop_gradient(t) / temperature, axis=-1)
    p_t = jnp.exp(log_p_t)
    # where: a class the teacher rules out (logit -inf) contributes 0, not 0 * inf.
    kl = jnp.where(p_t > 0, p_t * (log_p_t - log_p_s), 0.0).sum(-1)
    return _masked_mean(kl, mask) * temperature ** 2


def init_projection(key: jax.Array, in_dim: int, out_dim: int) -> dict[str, jax.Array]:
    """Parameters of a learnable linear map from student width to teacher width.

    Keep them in the parameter pytree you train, next to the student's (for example
    ``{"student": student_params, "proj": init_projection(...)}``), and hand them to
    :func:`feature_loss` as ``projection=``; the map acts on the last (channel) axis.

    Examples:
      >>> import jax
      >>> p = init_projection(jax.random.key(0), 3, 5)
      >>> p["kernel"].shape, p["bias"].shape
      ((3, 5), (5,))
    """
    if in_dim <= 0 or out_dim <= 0:
        raise ValueError(f"projection dims must be positive, got in_dim={in_dim}, out_dim={out_dim}")
    kernel = jax.nn.initializers.lecun_normal()(key, (in_dim, out_dim), jnp.float32)
    return {"kernel": kernel, "bias": jnp.zeros((out_dim,), jnp.float32)}


def _project(projection: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    kernel = projection["kernel"]
    if x.shape[-1] != kernel.shape[0]:
        raise ValueError(f"projection kernel {kernel.shape} does not fit student feature {x.shape}")
    return x @ kernel + projection["bias"]


def _rows(x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0], -1)


def attention_transfer(student_fmap: ArrayLike, teacher_fmap: ArrayLike, *,
                       mask: ArrayLike | None = None) -> jax.Array:
    """Attention transfer (Zagoruyko & Komodakis, 2017) between ``(N, ..., C)`` feature maps.

    The attention map of a feature map is the channel mean of its squared activations, flattened
    over the spatial axes and L2-normalised per example; the loss is the mean squared difference
    of the student's and teacher's maps (as in the authors' code). Channel counts may differ;
    the spatial axes must agree.

    Examples:
      >>> import jax.numpy as jnp
      >>> a = jnp.arange(2 * 4 * 4 * 3.0).reshape(2, 4, 4, 3)
      >>> b = jnp.concatenate([a, a], axis=-1)   # other width, same spatial pattern
      >>> float(attention_transfer(a, 3 * b))
      0.0
    """
    s, t = jnp.asarray(student_fmap), jnp.asarray(teacher_fmap)
    if s.ndim < 3 or s.shape[:-1] != t.shape[:-1]:
        raise ValueError(f"attention transfer needs (N, ..., C) maps with equal batch and spatial axes, "
                         f"got student {s.shape} and teacher {t.shape}")

    def attention(x):
        q = _rows((x.astype(jnp.float32) ** 2).mean(-1))
        return q / jnp.maximum(jnp.linalg.norm(q, axis=-1, keepdims=True), 1e-12)

    diff = attention(s) - attention(jax.lax.stop_gradient(t))
    return _masked_mean((diff ** 2).mean(-1), mask)


def feature_loss(student: ArrayLike, teacher: ArrayLike, *, kind: FeatureLoss = FeatureLoss.MSE,
                 projection: dict[str, jax.Array] | None = None, mask: ArrayLike | None = None) -> jax.Array:
    """Hint loss between a student and a teacher intermediate feature, mean over rows (axis 0).

    Args:
      student: ``(N, ..., C_s)`` student feature.
      teacher: ``(N, ..., C_t)`` teacher feature (under ``stop_gradient``).
      kind: a :class:`FeatureLoss`.
      projection: params from :func:`init_projection`, applied to the student's last axis
        (``C_s -> C_t``) first; needed for MSE and COSINE when the widths differ. ATTENTION
        takes none (it averages channels away).
      mask: optional ``(N,)`` row mask.

    Raises:
      ValueError: shapes do not agree (after projection), naming both shapes.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> s, t = jnp.ones((4, 3)), jnp.ones((4, 5))
      >>> proj = init_projection(jax.random.key(0), 3, 5)
      >>> feature_loss(s, t, projection=proj).shape
      ()
      >>> float(feature_loss(t, 2 * t, kind=FeatureLoss.COSINE))
      0.0
    """
    if not isinstance(kind, FeatureLoss):
        raise TypeError(f"kind must be a FeatureLoss, got {kind!r}")
    s, t = jnp.asarray(student), jnp.asarray(teacher)
    if s.ndim < 2 or t.ndim < 2:
        raise ValueError(f"features need a batch and a feature axis, got student {s.shape}, teacher {t.shape}")
    if kind is FeatureLoss.ATTENTION:
        if projection is not None:
            raise ValueError("attention transfer compares channel-averaged maps; it takes no projection")
        return attention_transfer(s, t, mask=mask)
    if projection is not None:
        s = _project(projection, s)
    if s.shape != t.shape:
        raise ValueError(f"student feature {s.shape} and teacher feature {t.shape} differ"
                         + ("" if projection is not None else "; pass projection=init_projection(...)"))
    t = jax.lax.stop_gradient(t)
    if kind is FeatureLoss.MSE:
        rows = _rows((s - t) ** 2).mean(-1)
    else:
        eps = 1e-8
        cos = (s * t).sum(-1) / jnp.maximum(jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(t, axis=-1), eps)
        rows = _rows(1.0 - cos).mean(-1)
    return _masked_mean(rows, mask)
