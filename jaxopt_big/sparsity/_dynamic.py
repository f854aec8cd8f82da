"""Dynamic sparse training: SET (random regrowth) and RigL (gradient regrowth).

The topology starts random at the target sparsity (``Start.RANDOM``, training from scratch as in
the papers) or from the largest weights (``Start.MAGNITUDE``, to sparsify a trained model). Every
``update_every`` updates until ``end_step``, each layer drops its ``f_t * active`` smallest-magnitude
active weights and regrows as many inactive ones (random for SET, largest ``|grad|`` for RigL), with
``f_t = drop_fraction * (1 + cos(pi * t / end_step)) / 2``. The count of active weights never
changes, and regrown weights start at exactly zero (they get no update on the step they appear).
"""

from __future__ import annotations

import enum
from typing import Any
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxopt_big import _checks
from jaxopt_big import tree as _tree
from jaxopt_big.sparsity import _masks, _scores, _select
from jaxopt_big.sparsity._transform import PruneState, check_params, check_trainable, masked_updates

__all__ = ["set_", "rigl", "drop_fraction_at", "Start"]


class Start(enum.Enum):
    """Initial topology of dynamic sparse training."""

    RANDOM = "random"        # a random mask (training from scratch)
    MAGNITUDE = "magnitude"  # keep the largest weights (sparsifying a trained model)

GrowFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]   # (weights, grads, key) -> grow score


def drop_fraction_at(count: jax.Array, drop_fraction: float, end_step: int) -> jax.Array:
    """Cosine-decayed drop fraction at update ``count`` (0 from ``end_step`` on).

    Examples:
      >>> [round(float(drop_fraction_at(t, 0.3, 100)), 3) for t in (0, 50, 100)]
      [0.3, 0.15, 0.0]
    """
    t = jnp.minimum(jnp.asarray(count, jnp.float32), end_step)
    return drop_fraction * 0.5 * (1.0 + jnp.cos(jnp.pi * t / end_step))


def _drop_grow(mask: jax.Array, w: jax.Array, grow: jax.Array, fraction: jax.Array) -> jax.Array:
    k = jnp.round(fraction * mask.sum()).astype(jnp.int32)
    inf = jnp.float32(jnp.inf)
    dropped = _select.bottom_k([jnp.where(mask, jnp.abs(w).astype(jnp.float32), inf)], k)[0]
    kept = mask & ~dropped
    grown = _select.bottom_k([jnp.where(kept, inf, -grow.astype(jnp.float32))], k)[0]
    return kept | grown


def _dynamic(name: str, tx, grow: GrowFn, *, sparsity: float | Sequence[_tree.Rule], update_every: int, end_step: int,
             drop_fraction: float, where: Any, distribution: _masks.Distribution, key: jax.Array,
             start: Start) -> optax.GradientTransformationExtraArgs:
    if not isinstance(start, Start):
        raise TypeError(f"{name}: start must be Start.RANDOM or Start.MAGNITUDE, got {start!r}")
    per_layer = ([r.value for r in _tree.as_rules(sparsity, "sparsity")] if isinstance(sparsity, (list, tuple))
                 else [sparsity])
    for value in per_layer:
        if value is not None:
            _checks.fraction(f"{name}: sparsity (constant in dynamic sparse training)", value)
    drop_fraction = _checks.fraction(f"{name}: drop_fraction", drop_fraction, closed=True)
    update_every = _checks.integer(f"{name}: update_every", update_every, low=1)
    end_step = _checks.integer(f"{name}: end_step", end_step, low=1)
    if key is None:
        raise ValueError(f"{name}: needs an explicit key= for the random initial topology")
    inner_tx = optax.with_extra_args_support(tx)

    def init(params):
        check_trainable(name, params, where)
        k_init, k_state = jax.random.split(key)
        scores = _scores.random(params, k_init) if start is Start.RANDOM else _scores.magnitude(params)
        masks = _masks.make_masks(scores, sparsity, where=where, distribution=distribution)
        return PruneState(inner_tx.init(params), masks, jnp.zeros([], jnp.int32), k_state)

    def rewire(masks, params, grads, key, fraction):
        leaves, treedef = jax.tree.flatten(masks, is_leaf=lambda x: x is None)
        keys = iter(jax.random.split(key, len(leaves)))
        return jax.tree.map(lambda m, w, g: m if m is None else _drop_grow(m, w, grow(w, g, next(keys)), fraction),
                            masks, params, grads, is_leaf=lambda x: x is None)

    def update(grads, state, params=None, **extra):
        check_params(name, params)
        key, sub = jax.random.split(state.key)
        count = state.count
        due = (count > 0) & (count % update_every == 0) & (count < end_step)
        fraction = drop_fraction_at(count, drop_fraction, end_step)
        masks = lax.cond(due, lambda: rewire(state.masks, params, grads, sub, fraction), lambda: state.masks)
        # Regrown weights stay zero on this step; dropped ones are zeroed.
        step_masks = jax.tree.map(lambda a, b: None if a is None else a & b, state.masks, masks,
                                  is_leaf=lambda x: x is None)
        updates, inner = inner_tx.update(_masks.apply_masks(grads, step_masks), state.inner, params, **extra)
        return masked_updates(step_masks, updates, params), PruneState(inner, masks, count + 1, key)

    return optax.GradientTransformationExtraArgs(init, update)


def set_(tx: optax.GradientTransformation, *, sparsity: float | Sequence[_tree.Rule], key: jax.Array,
         update_every: int = 100, end_step: int, drop_fraction: float = 0.3, where: Any = _tree.KERNELS,
         distribution: _masks.Distribution = _masks.Uniform(), start: Start = Start.RANDOM
         ) -> optax.GradientTransformationExtraArgs:
    """Sparse Evolutionary Training (Mocanu et al. 2018): drop smallest weights, regrow at random.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> params = {"d": {"kernel": jnp.ones((8, 8))}}
      >>> tx = set_(optax.sgd(0.1), sparsity=0.75, key=jax.random.key(0), end_step=10)
      >>> updates, state = tx.update(params, tx.init(params), params)
      >>> int((optax.apply_updates(params, updates)["d"]["kernel"] == 0).sum())
      48
    """
    grow = lambda w, g, k: _scores.uniform_like(k, w)
    return _dynamic("set_", tx, grow, sparsity=sparsity, update_every=update_every, end_step=end_step,
                    drop_fraction=drop_fraction, where=where, distribution=distribution, key=key, start=start)


def rigl(tx: optax.GradientTransformation, *, sparsity: float | Sequence[_tree.Rule], key: jax.Array,
         update_every: int = 100, end_step: int, drop_fraction: float = 0.3, where: Any = _tree.KERNELS,
         distribution: _masks.Distribution = _masks.Uniform(), start: Start = Start.RANDOM
         ) -> optax.GradientTransformationExtraArgs:
    """RigL (Evci et al. 2020): drop smallest weights, regrow where the dense gradient is largest.

    ``grads`` given to ``update`` must be the dense gradient (as the training step computes it).

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> params = {"d": {"kernel": jnp.ones((8, 8))}}
      >>> tx = rigl(optax.sgd(0.1), sparsity=0.5, key=jax.random.key(0), end_step=10)
      >>> state = tx.init(params)
      >>> int(state.masks["d"]["kernel"].sum())
      32
    """
    grow = lambda w, g, k: jnp.abs(g)
    return _dynamic("rigl", tx, grow, sparsity=sparsity, update_every=update_every, end_step=end_step,
                    drop_fraction=drop_fraction, where=where, distribution=distribution, key=key, start=start)
