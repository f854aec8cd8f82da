"""Leaf paths, `where=` selection and THE rule engine every per-layer option goes through.

A leaf's path is its keys joined by "/": ``params/Dense_0/kernel`` for a linen variables dict,
``l1/kernel`` for an ``nnx.State`` (the ``.value`` of a Variable is not part of the path), ``0/w``
for lists and tuples, and field names for NamedTuples and dataclasses. Compressed leaves
(:mod:`jaxopt_big.leaves`) are single leaves.

Rule semantics, the same for every technique (masks, prune, quantize, fake-quant, QAT, LSQ,
cluster, factorize, LoRA, sharding, one-shot methods, interception):

1. A pattern is a regex that must *fully* match the leaf path, or a module path above it: ``"mlp"``
   selects ``mlp/kernel`` and ``mlp/bias``, but not ``mlp_norm/scale``.
2. ``where`` picks the candidate leaves (default :data:`KERNELS`); an option given as one value
   applies to every candidate; given as ``[Rule(pattern, value), ...]`` the first rule that matches
   a candidate gives its value, and candidates no rule claims stay as they are.
3. A rule that claims no candidate raises ``ValueError`` listing the candidates (a typo never
   silently leaves layers out), unless the rule says ``required=False``.

Examples:
  >>> import jax.numpy as jnp
  >>> params = {"layer_0": {"attn": {"kernel": jnp.ones((4, 4))}, "mlp": {"kernel": jnp.ones((4, 8)),
  ...                                                                    "bias": jnp.ones(8)}}}
  >>> assign(params, [Rule(r"layer_\\d+/mlp", 4), Rule(".*", 8)])     # first match wins; bias is no candidate
  {'layer_0': {'attn': {'kernel': 8}, 'mlp': {'bias': None, 'kernel': 4}}}
  >>> assign(params, [Rule("layer_0/mlp", 4)])                      # unclaimed candidates stay as they are
  {'layer_0': {'attn': {'kernel': None}, 'mlp': {'bias': None, 'kernel': 4}}}
  >>> assign(params, [Rule("mlp", 4)], what="bits")
  Traceback (most recent call last):
  ...
  ValueError: bits: pattern 'mlp' matches no leaf; available paths: [layer_0/attn/kernel, layer_0/mlp/kernel]
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Generic, TypeVar

import jax
import jax.numpy as jnp

from jaxopt_big import _checks
from jaxopt_big import leaves as _leaves

__all__ = ["paths", "path_str", "select", "Rule", "is_rules", "assign", "map_assigned", "rules", "no_match_error",
           "compile_pattern", "Patterns", "PathRules", "assigned", "as_rules", "matches", "map_with_path",
           "map_selected", "KERNELS", "Where"]

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


class _FloatKernels:
    """The default ``where`` of the techniques that replace a float weight (quantization, LSQ,
    clustering, factorization): kernels that are floating arrays. Compressed leaves (``QArray``,
    ``LowRank``, ...) are compressed already and integer arrays (token ids, counters) hold no
    weights: on a mixed tree they stay as they are."""

    def __call__(self, path: str, leaf: Any) -> bool:
        dtype = getattr(leaf, "dtype", None)
        return (KERNELS(path, leaf) and not _leaves.is_compressed(leaf)
                and dtype is not None and jnp.issubdtype(dtype, jnp.floating))

    def __repr__(self) -> str:
        return "KERNELS (float arrays)"


def map_float_kernels(fn: Callable[[str, Any, Any], Any], params: Any, values: Any, where: Where, *,
                      purpose: str, what: str) -> Any:
    """:func:`map_assigned` over float leaves: the default ``where`` (:data:`KERNELS`) leaves compressed
    leaves and integer arrays out, and a ``where`` (or rule) that assigns a compressed leaf raises
    ``ValueError`` naming it (``purpose``, e.g. ``"to quantize"``, says why)."""
    def one(path, x, value):
        _leaves.refuse_compressed(path, x, purpose)
        return fn(path, x, value)
    where = _FloatKernels() if where is KERNELS else where
    return map_assigned(one, params, values, where=where, what=what)


def compile_pattern(pattern: str, *, what: str = "pattern") -> re.Pattern:
    """The one regex compiler for paths: every pattern a user gives (rules, ``where=``, block paths, layer
    selections) is compiled here.

    Raises:
      TypeError: ``pattern`` is not a str.
      ValueError: ``pattern`` is not a valid regex; the message names ``what`` and the pattern.

    Examples:
      >>> bool(compile_pattern(r"layer_\\d+").fullmatch("layer_3"))
      True
      >>> compile_pattern("(", what="blocks")
      Traceback (most recent call last):
      ...
      ValueError: blocks: invalid regex '(': missing ), unterminated subpattern at position 0
    """
    if not isinstance(pattern, str):
        raise TypeError(f"{what}: selection pattern must be a str regex, got {pattern!r} ({type(pattern).__name__})")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{what}: invalid regex {pattern!r}: {e}") from None


def _module_paths(path: str) -> list[str]:
    """The leaf path and every "/"-prefix of it, longest first (``a/b/c`` -> ``a/b/c``, ``a/b``, ``a``)."""
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(len(parts), 0, -1)]


def _matches(compiled: re.Pattern, path: str) -> bool:
    return any(compiled.fullmatch(p) for p in _module_paths(path))


def matches(pattern: str, path: str) -> bool:
    """Whether ``pattern`` fully matches ``path`` or a module path above it (the one meaning of a pattern).

    Examples:
      >>> matches("layer_0/mlp", "layer_0/mlp/up/kernel"), matches("layer_0/mlp", "layer_0/mlp_norm/scale")
      (True, False)
    """
    return _matches(compile_pattern(pattern), path)


def no_match_error(what: str, pattern: str, available: Sequence[str]) -> ValueError:
    """The one error for a pattern or rule that claims no leaf, listing what it could have claimed."""
    shown = ", ".join(available[:40]) + (" ..." if len(available) > 40 else "")
    return ValueError(f"{what}: pattern {pattern!r} matches no leaf; available paths: [{shown}]")


class Patterns:
    """Regexes met with paths one at a time, each of which must match one of them.

    Calling it with a path says whether any pattern matches it (:func:`matches` semantics: the path or
    a module path above it); :meth:`check` then raises :func:`no_match_error` for the first pattern
    that matched none of the paths seen.

    Examples:
      >>> pick = Patterns(["attn", "mlp"], what="where")
      >>> pick("attn/query"), pick("norm")
      (True, False)
      >>> pick.check()
      Traceback (most recent call last):
      ...
      ValueError: where: pattern 'mlp' matches no leaf; available paths: [attn/query, norm]
    """

    def __init__(self, patterns: str | Sequence[str], *, what: str = "where"):
        self.what = what
        self.patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        self.compiled = [compile_pattern(p, what=what) for p in self.patterns]
        self.hit = [False] * len(self.patterns)
        self.seen: list[str] = []

    def __call__(self, path: str) -> bool:
        self.seen.append(path)
        found = False
        for i, c in enumerate(self.compiled):
            if _matches(c, path):
                self.hit[i] = found = True
        return found

    def check(self) -> None:
        """Raises for the first pattern that matched none of the paths seen so far."""
        for p, h in zip(self.patterns, self.hit):
            if not h:
                raise no_match_error(self.what, p, list(dict.fromkeys(self.seen)))


T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Rule(Generic[T]):
    r"""A per-leaf option: ``value`` for the leaves whose path ``pattern`` matches.

    ``pattern`` is a regex that must fully match either the leaf path (``layer_0/mlp/up/kernel``) or
    a module path above it (``layer_0/mlp/up`` selects every leaf under that module). In a list of
    rules the first match wins; ``value=None`` claims leaves and leaves them as they are. A rule
    that claims no leaf is an error unless ``required=False``.

    Examples:
      >>> Rule(r"layer_\d+/mlp", 4).matches("layer_3/mlp/up/kernel")
      True
      >>> Rule(r"layer_\d+/mlp", 4).matches("layer_3/mlp_norm/scale")
      False
    """

    pattern: str
    value: T
    required: bool = dataclasses.field(default=True, kw_only=True)

    def __post_init__(self):
        compile_pattern(self.pattern, what="Rule")
        _checks.flag(f"Rule({self.pattern!r}).required", self.required)

    def matches(self, path: str) -> bool:
        """Whether this rule's pattern fully matches ``path`` or a module path above it."""
        return matches(self.pattern, path)


def is_rules(value: Any) -> bool:
    """True for a non-empty list or tuple of :class:`Rule` (the ``Sequence[Rule]`` form of an option)."""
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(r, Rule) for r in value)


def _is_pairs(value: Any) -> bool:
    """The pre-Rule spelling ``[(regex, value), ...]``, still read for one release."""
    return isinstance(value, (list, tuple)) and bool(value) and all(
        isinstance(r, (tuple, list)) and len(r) == 2 and isinstance(r[0], str) for r in value)


def as_rules(value: Any, what: str = "value") -> list[Rule]:
    """A ``Sequence[Rule]`` option as a list of rules; old ``(regex, value)`` pairs warn and convert."""
    if not (is_rules(value) or _is_pairs(value)):
        raise TypeError(f"{what}: expected a sequence of jb.tree.Rule, got {value!r}")
    if _is_pairs(value):
        warnings.warn(f"{what}: (regex, value) pairs are deprecated; use jb.tree.Rule(regex, value)",
                      DeprecationWarning, stacklevel=4)
        return [Rule(p, v) for p, v in value]
    return list(value)


def select(tree: Any, where: Where = KERNELS) -> Any:
    """Which leaves of ``tree`` are selected, as a pytree of Python bools.

    Args:
      tree: any pytree (linen params, ``nnx.State``, lists, tuples, NamedTuples).
      where: a regex (full match on the leaf path or on a module path above it), a list of regexes
        (any may match; each must match some leaf), a callable ``(path, leaf) -> bool``, or a pytree
        of bools with the structure of ``tree``.

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
      >>> select(p, "Dense_0")          # a module path selects every leaf under it
      {'Dense_0': {'bias': True, 'kernel': True}}
    """
    flat, treedef = _with_paths(tree)
    available = [p for p, _ in flat]
    if isinstance(where, str) or (isinstance(where, (list, tuple)) and where
                                  and all(isinstance(w, str) for w in where)):
        pick = Patterns(where, what="where")
        chosen = [pick(p) for p in available]
        pick.check()
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


class PathRules:
    """An option given as ``value | Sequence[Rule]``, read for paths met one at a time.

    The streaming form of :func:`assign`, for what has no parameter tree up front (the layers a model
    calls, in :mod:`jaxopt_big.intercept` and ``quant.qat``): calling it with a path gives the value of
    the first rule that matches it (``None`` if none does); :meth:`check` then raises
    :func:`no_match_error` for a required rule that claimed none of the paths seen.

    Examples:
      >>> pick = PathRules([Rule("attn", 8), Rule("mlp", 4)], what="bits")
      >>> pick("attn/query"), pick("norm")
      (8, None)
      >>> pick.check()
      Traceback (most recent call last):
      ...
      ValueError: bits: pattern 'mlp' matches no leaf; available paths: [attn/query, norm]
    """

    def __init__(self, value: Any, *, what: str = "value"):
        self.what = what
        self.single = not (is_rules(value) or _is_pairs(value))
        self.value = value
        self.rules = [] if self.single else as_rules(value, what)
        self.compiled = [compile_pattern(r.pattern, what=what) for r in self.rules]
        self.used = [False] * len(self.rules)
        self.seen: list[str] = []

    def __call__(self, path: str) -> Any:
        self.seen.append(path)
        if self.single:
            return self.value
        for i, (rule, pattern) in enumerate(zip(self.rules, self.compiled)):
            if _matches(pattern, path):
                self.used[i] = True
                return rule.value
        return None

    def check(self) -> None:
        """Raises for the first required rule that claimed no path seen so far."""
        for rule, u in zip(self.rules, self.used):
            if rule.required and not u:
                raise no_match_error(self.what, rule.pattern, list(dict.fromkeys(self.seen)))


def assign(tree: Any, value: Any, *, where: Where = KERNELS, what: str = "value") -> Any:
    """Per-leaf values of an option given as ``value | Sequence[Rule]``; ``None`` where none applies.

    The one way every technique reads a per-leaf option: ``where`` picks the candidate leaves; a
    plain value goes to every candidate; rules assign values among the candidates, first match
    wins, and candidates no rule claims get ``None`` (stay as they are). A required rule that claims
    no candidate raises :func:`no_match_error`, listing the candidates.

    Args:
      tree: the parameter pytree.
      value: one value for every candidate, or a list of :class:`Rule`.
      where: the candidates (see :func:`select`); default: kernels.
      what: the option's name, used in error messages.

    Examples:
      >>> import jax.numpy as jnp
      >>> p = {"attn": {"kernel": jnp.ones((2, 2))}, "mlp": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
      >>> assign(p, [Rule("mlp", 4), Rule(".*", 8)])
      {'attn': {'kernel': 8}, 'mlp': {'bias': None, 'kernel': 4}}
      >>> assign(p, 8, where="mlp")
      {'attn': {'kernel': None}, 'mlp': {'bias': 8, 'kernel': 8}}
    """
    flat, treedef, values = _assign_flat(tree, value, where, what)
    return jax.tree_util.tree_unflatten(treedef, values)


def _assign_flat(tree: Any, value: Any, where: Where, what: str) -> tuple[list[tuple[str, Any]], Any, list[Any]]:
    flat, treedef = _with_paths(tree)
    chosen = jax.tree.leaves(select(tree, where))
    pick = PathRules(value, what=what)
    values = [pick(p) if c else None for (p, _), c in zip(flat, chosen)]
    pick.check()
    return flat, treedef, values


def assigned(tree: Any, value: Any, *, where: Where = KERNELS, what: str = "value") -> list[tuple[str, Any, Any]]:
    """``[(path, leaf, value)]`` for the leaves :func:`assign` gives a value other than ``None``.

    Raises:
      ValueError: no leaf gets a value (:func:`no_match_error`, listing the paths).

    Examples:
      >>> assigned({"a": {"kernel": 1}, "b": {"kernel": 2}}, [Rule("b", 8)], where=".*")
      [('b/kernel', 2, 8)]
    """
    flat, _, values = _assign_flat(tree, value, where, what)
    out = [(p, x, v) for (p, x), v in zip(flat, values) if v is not None]
    if not out:
        raise no_match_error(what, repr(where), [p for p, _ in flat])
    return out


def rules(tree: Any, rules: Sequence[Rule] | Sequence[tuple[str, Any]]) -> Any:
    """Per-leaf values from rules over *all* leaves; first match wins, ``None`` where none.

    ``(regex, value)`` pairs are the deprecated spelling of rules (read with a ``DeprecationWarning``).

    Every rule must claim at least one leaf that no earlier rule took, so a typo cannot silently
    leave layers out. Same as ``assign(tree, rules, where=".*")``.

    Examples:
      >>> tree = {"Dense_0": {"kernel": 0}, "Dense_1": {"kernel": 0}}
      >>> rules(tree, [Rule("Dense_0/.*", 4), Rule(".*", 8)])
      {'Dense_0': {'kernel': 4}, 'Dense_1': {'kernel': 8}}
    """
    if not isinstance(rules, (list, tuple)) or not rules:
        raise TypeError(f"rules must be a sequence of jb.tree.Rule, got {rules!r}")
    return assign(tree, rules, where=lambda p, x: True, what="rules")


def map_assigned(fn: Callable[[str, Any, Any], Any], tree: Any, value: Any, *, where: Where = KERNELS,
                 what: str = "value") -> Any:
    """Applies ``fn(path, leaf, value)`` where :func:`assign` gives a value other than ``None``.

    Raises:
      ValueError: no leaf gets a value (the message lists the paths).

    Examples:
      >>> import jax.numpy as jnp
      >>> p = {"a": {"kernel": jnp.ones((2, 2))}, "b": {"kernel": jnp.ones((2, 2))}}
      >>> out = map_assigned(lambda path, w, k: w * k, p, [Rule("a", 3.0)])
      >>> float(out["a"]["kernel"][0, 0]), float(out["b"]["kernel"][0, 0])
      (3.0, 1.0)
    """
    given = {p: v for p, _, v in assigned(tree, value, where=where, what=what)}
    return map_with_path(lambda p, x: fn(p, x, given[p]) if p in given else x, tree)


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
        raise no_match_error("where", repr(where), paths(tree))
    return map_with_path(lambda p, x, s: fn(p, x) if s else x, tree, chosen)
