"""Masks from scores: scope, distribution across layers, and structure, all exact in count.

A mask tree has the structure of the parameters: a bool array (True = keep) for every selected leaf
and ``None`` for the others. Counts are exact: a layer of ``n`` weights at sparsity ``s`` loses exactly
``round(s * n)`` weights (Python's ``round``, half to even; or groups, for block and channel
structures), ties broken by position. A constant sparsity (also a number given to :func:`prune`) is
used as the Python number it is, eagerly and under ``jit`` alike; only a traced one (a schedule's
value, a ``jit`` argument) is float32, whose product can land on the other side of an exact half
(``0.7 * 45``: 31.5 in float32, 31.499... in float64) and prune one weight more or fewer.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxopt_big import _checks
from jaxopt_big import leaves as _leaves
from jaxopt_big import tree as _tree
from jaxopt_big.sparsity import _select

__all__ = ["Scope", "Uniform", "ERK", "Unstructured", "NM", "Tile", "Channel", "make_masks",
           "global_threshold", "apply_masks", "sparsity", "erk_densities"]


class Scope(enum.Enum):
    """Where the sparsity target applies: to each selected layer, or to all selected weights together."""

    LAYER = "layer"
    GLOBAL = "global"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Uniform:
    """Every selected layer gets the same sparsity."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ERK:
    """Erdős–Rényi-Kernel: layer density proportional to ``sum(shape) / prod(shape)`` (Evci et al.).

    Layers whose density would exceed 1 stay dense and the others share the remaining budget, so the
    overall sparsity of the selected weights is the target. ``power`` scales the raw ratio.
    """

    power: float = 1.0

    def __post_init__(self):
        _checks.store(self, power=_checks.number("ERK.power", self.power, above=0))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Unstructured:
    """Individual weights."""


@dataclasses.dataclass(frozen=True)
class NM:
    """Keep the ``n`` largest scores in every ``m`` consecutive weights along the input axis (-2)."""

    n: int
    m: int

    def __post_init__(self):
        n, m = _checks.integer("NM.n", self.n, low=1), _checks.integer("NM.m", self.m, low=1)
        if n > m:
            raise ValueError(f"NM needs integers 0 < n <= m, got n={self.n!r}, m={self.m!r}")
        _checks.store(self, n=n, m=m)


@dataclasses.dataclass(frozen=True)
class Tile:
    """Prune whole tiles (blocks) of ``shape`` over the trailing dims, ranked by the L2 norm of their scores."""

    shape: tuple[int, ...]

    def __post_init__(self):
        if not isinstance(self.shape, (tuple, list)) or not self.shape:
            raise ValueError(f"Tile shape must be a non-empty tuple of positive ints, got {self.shape!r}")
        _checks.store(self, shape=tuple(_checks.integer("Tile.shape", b, low=1) for b in self.shape))


@dataclasses.dataclass(frozen=True)
class Channel:
    """Prune whole slices along ``axis`` (filters / output channels for -1), ranked by slice L2 norm."""

    axis: int = -1

    def __post_init__(self):
        _checks.store(self, axis=_checks.integer("Channel.axis", self.axis))


Structure = Unstructured | NM | Tile | Channel
Distribution = Uniform | ERK


def check_sparsity(path: str, value: Any) -> Any:
    """A concrete sparsity in [0, 1) as a Python float; a traced one unchanged (the callers clip it)."""
    return _checks.fraction(f"{_checks.prefix(path)}sparsity", value, traced=True)


def check_nm_sparsity(nm: NM, sparsity: Any, path: str = "") -> None:
    """A concrete sparsity given with ``NM(n, m)`` must be 0 (not yet) or the pattern's ``1 - n / m``
    (to float32 rounding: ``2 / 3`` and ``1 - 1 / 3`` differ in their last bit)."""
    if isinstance(sparsity, (int, float)) and sparsity != 0 and abs(sparsity - (1.0 - nm.n / nm.m)) > 1e-6:
        raise ValueError(f"{_checks.prefix(path)}NM({nm.n}, {nm.m}) prunes {1.0 - nm.n / nm.m}; "
                         f"got sparsity={sparsity!r}")


def _count(s: Any, n: int) -> Any:
    """``round(s * n)``: in Python for a concrete (checked) ``s``, in float32 when traced."""
    if _checks.is_traced(s):
        return jnp.round(jnp.clip(jnp.asarray(s, jnp.float32), 0.0, 1.0) * n).astype(jnp.int32)
    return round(float(s) * n)


# --- structures: per-leaf group scores and their expansion back to weights --------------------

def _check_structure(path: str, shape: tuple[int, ...], structure: Structure) -> None:
    if not math.prod(shape):
        raise ValueError(f"{path}: cannot prune a zero-size leaf (shape {shape}); leave it out of where=")
    if isinstance(structure, Unstructured):
        return
    if len(shape) < 2:
        raise ValueError(f"{path}: structure {structure} needs a leaf with ndim >= 2, got shape {shape}")
    if isinstance(structure, NM) and shape[-2] % structure.m:
        raise ValueError(f"{path}: input axis {shape[-2]} is not divisible by m={structure.m}")
    if isinstance(structure, Tile):
        b = structure.shape
        if len(b) > len(shape) or any(d % s for d, s in zip(shape[-len(b):], b)):
            raise ValueError(f"{path}: shape {shape} is not divisible into tiles {b}")
    if isinstance(structure, Channel) and not -len(shape) <= structure.axis < len(shape):
        raise ValueError(f"{path}: channel axis {structure.axis} out of range for shape {shape}")


def _block_view(x: jax.Array, b: tuple[int, ...]) -> tuple[jax.Array, tuple[int, ...]]:
    lead = x.shape[:x.ndim - len(b)]
    split = sum(((d // s, s) for d, s in zip(x.shape[len(lead):], b)), ())
    return x.reshape(lead + split), tuple(len(lead) + 2 * i + 1 for i in range(len(b)))


def _like_explicit(fn, x: jax.Array, arg: jax.Array) -> jax.Array:
    """``fn(arg)``; on explicit mesh axes run with auto axes and give the result ``x``'s spec."""
    return _select.auto_explicit(fn, x, jax.typeof(x).sharding.spec)(arg)


def _block_scores(score: jax.Array, b: tuple[int, ...]) -> jax.Array:
    view, axes = _block_view(score, b)
    return jnp.sum(view * view, axis=axes)


def _group_scores(score: jax.Array, structure: Structure) -> jax.Array:
    score = jnp.asarray(score, jnp.float32)
    if isinstance(structure, Tile):  # the block grid keeps the weight's dims, so its sharding too
        return _like_explicit(lambda s: _block_scores(s, structure.shape), score, score)
    if isinstance(structure, Channel):
        axis = structure.axis % score.ndim
        return jnp.sum(score * score, axis=tuple(a for a in range(score.ndim) if a != axis))
    return score


def _expand(keep: jax.Array, x: jax.Array, structure: Structure) -> jax.Array:
    """Group keep-flags back to weights, tied to ``x`` so the mask takes the parameter's sharding."""
    if isinstance(structure, Unstructured):
        return keep
    # (|x| < 0) is always False, but makes the result elementwise in x for sharding propagation.
    expand = lambda k: _expand_groups(k, tuple(x.shape), structure)
    return (_like_explicit(expand, x, keep) if isinstance(structure, Tile) else expand(keep)) | (jnp.abs(x) < 0)


def _expand_groups(keep: jax.Array, shape: tuple[int, ...], structure: Structure) -> jax.Array:
    if isinstance(structure, Tile):
        b = structure.shape
        lead = len(shape) - len(b)
        for i, s in enumerate(b):
            keep = jnp.repeat(keep, s, axis=lead + i)
        return keep
    if isinstance(structure, Channel):
        axis = structure.axis % len(shape)
        return jnp.broadcast_to(jnp.expand_dims(keep, tuple(a for a in range(len(shape)) if a != axis)), shape)
    return keep


@functools.partial(jax.jit, static_argnums=1)
def _nm_mask(score: jax.Array, nm: NM) -> jax.Array:
    """Keep the n largest of each m consecutive scores along axis -2 (ties: lower index kept)."""
    shape = score.shape
    g = jnp.moveaxis(_select.ukey(score).reshape(shape[:-2] + (shape[-2] // nm.m, nm.m, shape[-1])), -2, -1)
    # rank within the group: how many others beat this one (higher key, or equal key and lower index)
    a, b = g[..., :, None], g[..., None, :]
    i = jnp.arange(nm.m)
    beats = (b > a) | ((b == a) & (i[None, :] < i[:, None]))
    keep = beats.sum(-1) < nm.n
    return jnp.moveaxis(keep, -1, -2).reshape(shape)


# --- distributions ---------------------------------------------------------------------------

def erk_densities(shapes: Sequence[tuple[int, ...]], sparsity: Any, *, power: float = 1.0) -> jax.Array:
    """ERK layer densities for an overall ``sparsity`` of the given layer shapes (traceable).

    Examples:
      >>> d = erk_densities([(64, 64), (64, 10)], 0.5)
      >>> round(float((d * jnp.array([64 * 64, 640])).sum() / (64 * 64 + 640)), 4)
      0.5
    """
    sizes = jnp.array([math.prod(s) for s in shapes], jnp.float32)
    raw = jnp.array([(sum(s) / math.prod(s)) ** power for s in shapes], jnp.float32)
    budget = (1.0 - jnp.asarray(sparsity, jnp.float32)) * sizes.sum()
    dense = jnp.zeros(len(shapes), bool)
    for _ in range(len(shapes)):  # each round fixes at least one more layer at density 1, or is stable
        eps = (budget - jnp.where(dense, sizes, 0).sum()) / jnp.maximum(jnp.where(dense, 0, raw * sizes).sum(), 1e-30)
        dense = dense | (eps * raw > 1.0)
    return jnp.where(dense, 1.0, jnp.clip(eps * raw, 0.0, 1.0))


# --- masks -----------------------------------------------------------------------------------

def _with_paths(tree: Any) -> list[tuple[str, Any]]:
    return [(_tree.path_str(p), x) for p, x in _leaves.leaves_with_path(tree)]


def _prunable(name: str, tree: Any, value: Any, where: Any, what: str) -> list[tuple[str, Any, Any]]:
    """:func:`jaxopt_big.tree.assigned`, refusing a compressed leaf among the selected ones."""
    flat = _tree.assigned(tree, value, where=where, what=what)
    for p, x, _ in flat:
        _leaves.refuse_compressed(f"{name}: {p}", x, "it can prune")
    return flat


def _layer_sparsities(scores: Any, sparsity: Any, where: Any, scope: Scope, distribution: Distribution,
                      structure: Structure) -> list[tuple[str, Any, Any]]:
    """``[(path, score, sparsity)]`` of the leaves to prune: ``where`` picks them, rules assign among them."""
    if _tree.is_rules(sparsity) or isinstance(sparsity, (list, tuple)):
        if scope is not Scope.LAYER or not isinstance(distribution, Uniform):
            raise ValueError("per-layer sparsity rules need scope=Scope.LAYER and distribution=Uniform()")
        return _prunable("make_masks", scores, sparsity, where, "sparsity")
    flat = _prunable("make_masks", scores, True, where, "where")
    if isinstance(structure, NM) and sparsity is None:
        return [(p, x, 1.0 - structure.n / structure.m) for p, x, _ in flat]
    sparsity = check_sparsity("", sparsity)
    if isinstance(distribution, ERK) and scope is Scope.LAYER:
        d = erk_densities([tuple(x.shape) for _, x, _ in flat], sparsity, power=distribution.power)
        return [(p, x, 1.0 - d[i]) for i, (p, x, _) in enumerate(flat)]
    return [(p, x, sparsity) for p, x, _ in flat]


def make_masks(scores: Any, sparsity: Any = None, *, where: Any = _tree.KERNELS, scope: Scope = Scope.LAYER,
               distribution: Distribution = Uniform(), structure: Structure = Unstructured()) -> Any:
    """Keep-masks that prune the lowest scores of the selected leaves to ``sparsity``.

    Args:
      scores: score pytree (see :mod:`scores`); higher is more important, NaN is lowest.
      sparsity: fraction in [0, 1) to prune (a float or a traced scalar), or with ``Scope.LAYER`` and
        ``Uniform()`` per-layer rules ``[jb.tree.Rule(regex, fraction), ...]`` assigned among the leaves
        ``where`` selects (first match wins; leaves no rule claims, or claimed with ``None``, are not
        pruned; see :mod:`jaxopt_big.tree`). With ``NM`` it may be None (the pattern fixes it) and a
        traced value of 0 means "no pruning yet".
      where: which leaves to prune (:func:`jaxopt_big.tree.select`); default: kernels.
      scope: ``Scope.LAYER`` (exact count per leaf) or ``Scope.GLOBAL`` (exact count over all
        selected leaves, by :func:`global_threshold`).
      distribution: ``Uniform()`` or ``ERK()`` layer sparsities (``Scope.LAYER`` only).
      structure: ``Unstructured()``, ``NM(n, m)``, ``Tile(shape)`` or ``Channel(axis)``.

    Returns:
      A tree like ``scores``: a bool array (True = keep) at each selected leaf, None elsewhere.

    Raises:
      ValueError: a sparsity outside [0, 1), a selection matching nothing, a structure that does not
        fit a leaf (names the leaf path and shape), or an incompatible option combination.

    Examples:
      >>> import jax.numpy as jnp
      >>> s = {"d": {"kernel": jnp.array([[1.0, 4.0], [3.0, 2.0]]), "bias": jnp.ones(2)}}
      >>> m = make_masks(s, 0.5)
      >>> m["d"]["kernel"].tolist(), m["d"]["bias"]
      ([[False, True], [True, False]], None)
    """
    if not isinstance(scope, Scope):
        raise TypeError(f"scope must be a Scope, got {scope!r}")
    if not isinstance(distribution, (Uniform, ERK)):
        raise TypeError(f"distribution must be Uniform() or ERK(), got {distribution!r}")
    if not isinstance(structure, (Unstructured, NM, Tile, Channel)):
        raise TypeError(f"structure must be Unstructured(), NM, Tile or Channel, got {structure!r}")
    if sparsity is None and not isinstance(structure, NM):
        raise ValueError(f"sparsity is required for structure {structure}")
    flat = _layer_sparsities(scores, sparsity, where, scope, distribution, structure)
    for p, x, _ in flat:
        _check_structure(p, tuple(x.shape), structure)
    flat = [(p, x, check_sparsity(p, s)) for p, x, s in flat]
    _checks.finite([(p, x) for p, x, _ in flat], "scores")
    if isinstance(structure, NM):
        if scope is not Scope.LAYER or not isinstance(distribution, Uniform):
            raise ValueError("NM is a per-group pattern: use scope=Scope.LAYER and distribution=Uniform()")
        for p, _, s in flat:
            check_nm_sparsity(structure, s, p)
        masks = {p: _nm_mask(x, structure) | ~(jnp.asarray(s) > 0) for p, x, s in flat}
    elif scope is Scope.GLOBAL:
        if not isinstance(distribution, Uniform):
            raise ValueError(
                f"distribution {distribution} applies to Scope.LAYER; GLOBAL picks layer sparsities itself")
        sparsity = check_sparsity("", sparsity)
        groups = [_group_scores(x, structure) for _, x, _ in flat]
        pruned = _select.bottom_k(groups, _count(sparsity, sum(int(g.size) for g in groups)))
        masks = {p: _expand(~m, x, structure) for (p, x, _), m in zip(flat, pruned)}
    else:
        masks = {}
        for p, x, s in flat:
            g = _group_scores(x, structure)
            masks[p] = _expand(~_select.bottom_k([g], _count(s, int(g.size)))[0], x, structure)
    return _tree.map_with_path(lambda p, x: masks.get(p), scores)


def global_threshold(scores: Any, sparsity: Any, *, where: Any = _tree.KERNELS) -> jax.Array:
    """The largest pruned score when pruning ``round(sparsity * n)`` of all selected scores.

    Exact (equal to the value at that rank of a full sort), computed in a handful of O(n)
    counting passes without sorting, concatenating or gathering the leaves; sharded leaves are
    counted where they live. NaN ranks lowest, so the result is NaN when only NaNs are pruned; it
    is also NaN when nothing is pruned. Scores are compared as float32.

    Examples:
      >>> import jax.numpy as jnp
      >>> s = {"a": {"kernel": jnp.arange(6.0).reshape(2, 3)}, "b": {"kernel": jnp.arange(6.0, 10).reshape(2, 2)}}
      >>> float(global_threshold(s, 0.4))
      3.0
    """
    sparsity = check_sparsity("", sparsity)
    flat = [(p, x) for p, x, _ in _prunable("global_threshold", scores, True, where, "where")]
    for p, x in flat:
        _check_structure(p, tuple(x.shape), Unstructured())
    _checks.finite(flat, "scores")
    arrays = [x for _, x in flat]
    k = _count(sparsity, sum(int(x.size) for x in arrays))
    t = _select.kth_smallest(arrays, jnp.asarray(k) - 1, lambda i, x: _select.ukey(x))[0]
    return jnp.where(jnp.asarray(k) > 0, _select.from_ukey(t), jnp.nan)


def apply_masks(params: Any, masks: Any) -> Any:
    """Zeroes the pruned weights: ``where(mask, w, 0)`` where a mask is given, ``w`` where it is None.

    Raises:
      ValueError: the mask tree does not match the parameters, a mask's shape does not, or a mask is
        given for a compressed leaf (names its path).

    Examples:
      >>> import jax.numpy as jnp
      >>> apply_masks({"w": jnp.array([1.0, 2.0]), "b": jnp.ones(1)}, {"w": jnp.array([True, False]), "b": None})
      {'b': Array([1.], dtype=float32), 'w': Array([1., 0.], dtype=float32)}
    """
    def one(path, m, w):
        if m is None:
            return w
        _leaves.refuse_compressed(f"apply_masks: {path}", w, "it can prune")
        if jnp.shape(m) != jnp.shape(w):
            raise ValueError(f"{path}: mask shape {jnp.shape(m)} differs from parameter shape {jnp.shape(w)}")
        return jnp.where(m, w, jnp.zeros((), w.dtype))

    is_none = lambda x: x is None
    treedef = jax.tree.structure(masks, is_leaf=is_none)
    try:
        treedef.flatten_up_to(params)  # type: ignore[attr-defined]  # missing from jax's type stubs
    except ValueError as e:
        raise ValueError(f"mask tree does not match the parameters: {e}") from None
    return jax.tree_util.tree_map_with_path(lambda p, m, w: one(_tree.path_str(p), m, w), masks, params,
                                            is_leaf=is_none)


def sparsity(tree: Any) -> dict[str, float]:
    """Fraction of zeros (or False) per array leaf, by path; compressed leaves use their dense value.

    Examples:
      >>> import jax.numpy as jnp
      >>> sparsity({"w": jnp.array([0.0, 1.0, 0.0, 2.0])})
      {'w': 0.5}
    """
    out = {}
    for p, x in _with_paths(tree):
        x = x.dense() if _leaves.is_compressed(x) else x
        out[p] = float(jnp.mean(jnp.asarray(x) == 0)) if jnp.size(x) else 0.0
    return out
