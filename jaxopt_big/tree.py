"""Leaf paths, `where=` selection and first-match rules over parameter pytrees.

A leaf's path is its keys joined by "/": ``params/Dense_0/kernel`` for a linen variables dict,
``l1/kernel`` for an ``nnx.State`` (the ``.value`` of a Variable is not part of the path), ``0/w``
for lists and tuples, and field names for NamedTuples and dataclasses. Compressed leaves
(:mod:`jaxopt_big.leaves`) are single leaves.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Sequence

import jax

from jaxopt_big import leaves as _leaves

__all__ = ["paths", "path_str", "select", "rules", "map_with_path", "map_selected", "KERNELS", "Where"]

Where = str | Sequence[str] | Callable[[str, Any], bool] | Any


def path_str(keypath: Iterable[Any]) -> str:
    """Formats a JAX key path as a "/"-joined string.

    Examples:
      >>> import jax
      >>> [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path({"a": [1, 2]})]
      ['a/0', 'a/1']
    """
    parts = []
    keypath = tuple(keypath)
    for i, k in enumerate(keypath):
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            if k.name == "value" and i == len(keypath) - 1 and i > 0:
                continue  # nnx Variable payload: the path names the variable itself
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k))
    return "/".join(parts)


def _with_paths(tree: Any) -> tuple[list[tuple[str, Any]], Any]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_leaves.is_compressed)
    return [(path_str(p), x) for p, x in flat], treedef


def paths(tree: Any) -> list[str]:
    """All leaf paths, in flattening order.

    Examples:
      >>> paths({"params": {"Dense_0": {"kernel": 1, "bias": 2}}})
      ['params/Dense_0/bias', 'params/Dense_0/kernel']
    """
    return [p for p, _ in _with_paths(tree)[0]]


def map_with_path(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """``jax.tree.map`` whose ``fn`` gets the "/"-joined path first; compressed leaves stay whole.

    Examples:
      >>> map_with_path(lambda p, x: p, {"a": {"b": 0}})
      {'a': {'b': 'a/b'}}
    """
    return jax.tree_util.tree_map_with_path(lambda p, x, *r: fn(path_str(p), x, *r), tree, *rest,
                                            is_leaf=_leaves.is_compressed)


class _Kernels:
    """Default selection: leaves named ``kernel`` or ``weight`` with ``ndim >= 2``."""

    def __call__(self, path: str, leaf: Any) -> bool:
        return path.rsplit("/", 1)[-1] in ("kernel", "weight") and len(getattr(leaf, "shape", ())) >= 2

    def __repr__(self) -> str:
        return "KERNELS"


KERNELS = _Kernels()


def _compile(pattern: str) -> re.Pattern:
    if not isinstance(pattern, str):
        raise TypeError(f"selection pattern must be a str regex, got {pattern!r} ({type(pattern).__name__})")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"invalid regex {pattern!r}: {e}") from None


def _no_match(pattern: str, available: Sequence[str]) -> ValueError:
    shown = ", ".join(available[:40]) + (" ..." if len(available) > 40 else "")
    return ValueError(f"pattern {pattern!r} matches no leaf; available paths: [{shown}]")


def select(tree: Any, where: Where = KERNELS) -> Any:
    """Which leaves of ``tree`` are selected, as a pytree of Python bools.

    Args:
      tree: any pytree (linen params, ``nnx.State``, lists, tuples, NamedTuples).
      where: a regex (full match on the leaf path), a list of regexes (any may match; each must
        match some leaf), a callable ``(path, leaf) -> bool``, or a pytree of bools with the
        structure of ``tree``.

    Returns:
      A pytree with the structure of ``tree`` holding ``True``/``False``.

    Raises:
      ValueError: a regex matches no leaf (the message lists the paths), a regex is invalid,
        or a bool tree has another structure.

    Examples:
      >>> import jax.numpy as jnp
      >>> p = {"Dense_0": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
      >>> select(p)
      {'Dense_0': {'bias': False, 'kernel': True}}
      >>> select(p, ".*bias")
      {'Dense_0': {'bias': True, 'kernel': False}}
    """
    flat, treedef = _with_paths(tree)
    available = [p for p, _ in flat]
    if isinstance(where, str) or (isinstance(where, (list, tuple)) and where
                                  and all(isinstance(w, str) for w in where)):
        patterns = [where] if isinstance(where, str) else list(where)
        compiled = [_compile(w) for w in patterns]
        hits = [[bool(c.fullmatch(p)) for p in available] for c in compiled]
        for w, h in zip(patterns, hits):
            if not any(h):
                raise _no_match(w, available)
        chosen = [any(col) for col in zip(*hits)] if available else []
    elif callable(where):
        chosen = [bool(where(p, x)) for p, x in flat]
    else:
        mask_flat, mask_def = jax.tree_util.tree_flatten(where, is_leaf=_leaves.is_compressed)
        if mask_def != treedef:
            raise ValueError(f"bool selection tree has structure {mask_def}, expected the structure "
                             f"of the parameters {treedef}")
        for p, m in zip(available, mask_flat):
            if not isinstance(m, bool) and getattr(m, "shape", None) != ():
                raise ValueError(f"{p}: selection value must be a bool, got {m!r}")
        chosen = [bool(m) for m in mask_flat]
    return jax.tree_util.tree_unflatten(treedef, chosen)


def rules(tree: Any, rules: Sequence[tuple[str, Any]]) -> Any:
    """Per-leaf values from ``(regex, value)`` rules; first full match wins, ``None`` where none.

    Every rule must match at least one leaf that no earlier rule took, so a typo cannot silently
    leave layers out.

    Examples:
      >>> tree = {"Dense_0": {"kernel": 0}, "Dense_1": {"kernel": 0}}
      >>> rules(tree, [("Dense_0/.*", 4), (".*", 8)])
      {'Dense_0': {'kernel': 4}, 'Dense_1': {'kernel': 8}}
    """
    if isinstance(rules, (str, bytes)) or not all(isinstance(r, (tuple, list)) and len(r) == 2 for r in rules):
        raise TypeError(f"rules must be a sequence of (regex, value) pairs, got {rules!r}")
    flat, treedef = _with_paths(tree)
    available = [p for p, _ in flat]
    compiled = [(_compile(pat), pat, val) for pat, val in rules]
    used = [False] * len(compiled)
    values = []
    for p in available:
        value = None
        for i, (c, _, val) in enumerate(compiled):
            if c.fullmatch(p):
                used[i], value = True, val
                break
        values.append(value)
    for (_, pat, _), u in zip(compiled, used):
        if not u:
            raise _no_match(pat, available)
    return jax.tree_util.tree_unflatten(treedef, values)


def map_selected(fn: Callable[[str, Any], Any], tree: Any, where: Where = KERNELS) -> Any:
    """Applies ``fn(path, leaf)`` to the selected leaves, keeps the others; raises if none selected.

    Examples:
      >>> import jax.numpy as jnp
      >>> out = map_selected(lambda p, w: w * 0, {"d": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}})
      >>> out["d"]["kernel"].sum(), out["d"]["bias"].sum()
      (Array(0., dtype=float32), Array(2., dtype=float32))
    """
    chosen = select(tree, where)
    if not any(jax.tree.leaves(chosen)):
        raise ValueError(f"selection {where!r} matches no leaf; available paths: {paths(tree)}")
    return map_with_path(lambda p, x, s: fn(p, x) if s else x, tree, chosen)
