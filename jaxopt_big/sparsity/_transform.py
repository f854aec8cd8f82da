"""``prune``: an optax wrapper that keeps the selected weights at a scheduled sparsity."""

from collections.abc import Callable
from typing import Any, NamedTuple

import dataclasses

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxopt_big import _checks
from jaxopt_big import leaves as _leaves
from jaxopt_big import tree as _tree
from jaxopt_big.sparsity import _masks, _scores

__all__ = ["PruneState", "prune"]

ScoreFn = Callable[[Any, Any, jax.Array], Any]


class PruneState(NamedTuple):
    """State of :func:`prune` (and of the dynamic sparse transforms).

    Attributes:
      inner: state of the wrapped transform.
      masks: keep-masks, a bool array per selected leaf and None elsewhere.
      count: int32 number of updates so far (the schedule's step).
      key: PRNG key for random scores / regrowth, split at every update.
      dense: with ``straight_through=True`` the dense weights that the gradient trains; else None.
    """

    inner: Any  # an optax.OptState: its recursive alias defeats pdoc, which would warn on every build
    masks: Any
    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's own states do
    key: jax.Array
    dense: Any = None


def score_fn(score: Any) -> ScoreFn:
    """The built-in scores as ``(params, grads, key) -> scores``; other callables are used as given."""
    if score is _scores.magnitude:
        return lambda p, g, k: _scores.magnitude(p)
    if score is _scores.saliency:
        return lambda p, g, k: _scores.saliency(p, g)
    if score is _scores.random:
        return lambda p, g, k: _scores.random(p, k)
    if not callable(score):
        raise TypeError(f"score must be magnitude, saliency, random or a callable (params, grads, key), got {score!r}")
    return score


def as_schedule(sparsity: Any, structure: _masks.Structure = _masks.Unstructured()) -> optax.Schedule:
    """A number becomes a constant schedule; the value at step 0 is checked to be in [0, 1).

    With ``NM(n, m)`` a constant must be 0 or the pattern's own sparsity ``1 - n / m``.
    """
    if callable(sparsity):
        _masks.check_sparsity("", sparsity(jnp.int32(0)))
        return sparsity
    s = _masks.check_sparsity("", sparsity)
    if isinstance(structure, _masks.NM):
        _masks.check_nm_sparsity(structure, s)
    return lambda count: s  # a Python number: the mask counts are those of eager make_masks


def as_schedules(sparsity: Any, structure: _masks.Structure = _masks.Unstructured()) -> Callable[[jax.Array], Any]:
    """``count -> sparsity`` for a float, a schedule or per-layer rules of either (see :mod:`jaxopt_big.tree`)."""
    if not (_tree.is_rules(sparsity) or isinstance(sparsity, (list, tuple))):
        return as_schedule(sparsity, structure)
    rules = _tree.as_rules(sparsity, "sparsity")
    rules = [dataclasses.replace(r, value=None if r.value is None else as_schedule(r.value, structure)) for r in rules]
    return lambda count: [dataclasses.replace(r, value=None if r.value is None else r.value(count)) for r in rules]


def check_params(name: str, params: Any) -> None:
    if params is None:
        raise ValueError(f"{name}: update needs the current params (tx.update(grads, state, params))")


def check_trainable(name: str, params: Any, where: Any) -> None:
    """``where`` selects some leaf of ``params``, and no compressed one.

    A compressed leaf (``QArray``, ``LowRank``, ...) is not a float array the optimizer trains, so it
    cannot be pruned while training; unselected ones pass through untouched.
    """
    for path, x, _ in _tree.assigned(params, True, where=where, what="where"):
        _leaves.refuse_compressed(f"{name}: {path}", x, "it can prune while training")


def ones_masks(params: Any, sparsity: Any, where: Any) -> Any:
    """All-True masks (with the parameter's sharding) at the leaves ``sparsity`` applies to, None elsewhere."""
    check_trainable("prune", params, where)
    given = {p for p, _, _ in _tree.assigned(params, sparsity, where=where, what="sparsity")}
    return _tree.map_with_path(lambda p, x: jnp.full_like(x, True, dtype=bool) if p in given else None, params)


def masked_updates(masks: Any, updates: Any, params: Any) -> Any:
    """Updates that leave pruned weights at exactly zero: ``-w`` where the mask is False."""
    return jax.tree.map(lambda m, u, w: u if m is None else jnp.where(m, u, -w).astype(u.dtype),
                        masks, updates, params, is_leaf=lambda x: x is None)


def prune(tx: optax.GradientTransformation, *, sparsity: float | optax.Schedule, score: Any = _scores.magnitude,
          update_every: int = 100, where: Any = _tree.KERNELS, scope: _masks.Scope = _masks.Scope.LAYER,
          distribution: _masks.Distribution = _masks.Uniform(),
          structure: _masks.Structure = _masks.Unstructured(), straight_through: bool = False,
          sparse_gradients: bool = True, key: jax.Array | None = None) -> optax.GradientTransformationExtraArgs:
    """Wraps ``tx`` so the selected weights are pruned to a (scheduled) sparsity while it trains them.

    At every ``update_every``-th update (the first included) the masks are recomputed from
    ``score`` at ``sparsity(count)`` under ``lax.cond`` (the schedule is traced: no recompilation;
    the other steps run only the branch that keeps the masks). The returned updates set pruned
    weights to exactly zero. By default the gradients of pruned weights are zeroed before ``tx``,
    so ``tx`` never sees them: its moments at pruned positions stay zero and a ``tx`` that couples
    weights (``clip_by_global_norm`` inside it) sees only the kept weights' gradients. With
    ``sparse_gradients=False``, ``tx`` sees the full gradient (as in TF-MOT and jaxpruner), which
    saves one masking per step; with an elementwise ``tx`` (sgd, momentum, adam, adamw) the kept
    weights then train exactly alike, and only a weight that a later mask update brings back starts
    from other optimizer moments. With ``straight_through=True`` the state keeps the dense weights:
    the gradient (taken at the masked weights) trains all of them, pruned ones can come back at the
    next mask update, and the params seen by the model are the masked dense weights.

    Cost between mask updates: the masks pass through the ``lax.cond`` without copies and every
    masking fuses into ``tx``'s own elementwise passes, but each reads the 1-byte masks: with
    ``sparse_gradients`` adam's two moment passes and its final update do, without it only the
    final update (see ``benchmarks/sparsity_prune_step.py``). A mask update costs about one adam step.

    Args:
      tx: any optax transform.
      sparsity: a fraction in [0, 1) or a schedule (see :mod:`schedules`), or per-layer rules
        ``[jb.tree.Rule(regex, fraction or schedule), ...]`` among the leaves ``where`` selects (leaves
        no rule claims are not pruned), as in :func:`make_masks`.
      score: ``magnitude``, ``saliency``, ``random`` or a callable ``(params, grads, key) -> scores``.
      update_every: mask update period in updates.
      where, scope, distribution, structure: as in :func:`make_masks`.
      straight_through: keep dense weights and train them with the gradient of the masked model.
      sparse_gradients: zero the gradients of pruned weights before ``tx`` (default); False hands
        ``tx`` the full gradient.
      key: PRNG key for random scores (required when ``score`` is ``random``).

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> params = {"d": {"kernel": jnp.array([[1.0, -3.0], [0.5, 2.0]])}}
      >>> tx = prune(optax.sgd(0.0), sparsity=0.5)
      >>> updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
      >>> optax.apply_updates(params, updates)["d"]["kernel"].tolist()
      [[0.0, -3.0], [0.0, 2.0]]
    """
    schedule = as_schedules(sparsity, structure)
    scorer = score_fn(score)
    update_every = _checks.integer("update_every", update_every, low=1)
    straight_through = _checks.flag("straight_through", straight_through)
    sparse_gradients = _checks.flag("sparse_gradients", sparse_gradients)
    if score is _scores.random and key is None:
        raise ValueError("score=random needs an explicit key=")
    inner_tx = optax.with_extra_args_support(tx)

    def new_masks(weights, grads, key, s):
        return _masks.make_masks(scorer(weights, grads, key), s, where=where, scope=scope,
                                 distribution=distribution, structure=structure)

    def init(params):
        return PruneState(inner_tx.init(params), ones_masks(params, schedule(jnp.int32(0)), where),
                          jnp.zeros([], jnp.int32), jax.random.key(0) if key is None else jnp.copy(key),
                          jax.tree.map(jnp.copy, params) if straight_through else None)  # own buffers: donation-safe

    def update(grads, state, params=None, **extra):
        check_params("prune", params)
        weights = state.dense if straight_through else params

        def refresh():  # only runs on mask-update steps (lax.cond executes one branch)
            key, sub = jax.random.split(state.key)
            return new_masks(weights, grads, sub, schedule(state.count)), key

        masks, key = lax.cond(state.count % update_every == 0, refresh, lambda: (state.masks, state.key))
        if not straight_through:
            if sparse_gradients:
                grads = _masks.apply_masks(grads, masks)
            updates, inner = inner_tx.update(grads, state.inner, params, **extra)
            return masked_updates(masks, updates, params), PruneState(inner, masks, state.count + 1, key)
        updates, inner = inner_tx.update(grads, state.inner, weights, **extra)
        dense = optax.apply_updates(weights, updates)
        sparse = _masks.apply_masks(dense, masks)
        updates = jax.tree.map(lambda n, w: (n - w).astype(w.dtype), sparse, params)
        return masked_updates(masks, updates, params), PruneState(inner, masks, state.count + 1, key, dense)

    return optax.GradientTransformationExtraArgs(init, update)
