"""Placing parameters, optimizer states and batches on a mesh with ``NamedSharding``."""

from __future__ import annotations

from typing import Any
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from jaxopt_big import tree as _tree
from jaxopt_big._batch_sharding import axis_size

__all__ = ["param_shardings", "shard_params"]

Rules = Sequence[_tree.Rule[jax.sharding.PartitionSpec]]


def _spec_axes(spec: jax.sharding.PartitionSpec) -> list[str]:
    out: list[str] = []
    for entry in spec:
        if entry is None:
            continue
        out.extend(entry if isinstance(entry, tuple) else (entry,))
    return out


def _check_rules(rules: Rules, mesh: jax.sharding.Mesh) -> list[_tree.Rule]:
    rules = _tree.as_rules(rules, "sharding rules") if rules else []
    for rule in rules:
        if not isinstance(rule.value, jax.sharding.PartitionSpec):
            raise TypeError(f"rule {rule.pattern!r}: value must be a jax.P(...) PartitionSpec, got {rule.value!r}")
        unknown = [a for a in _spec_axes(rule.value) if a not in mesh.axis_names]
        if unknown:
            raise ValueError(f"rule {rule.pattern!r}: {rule.value} names mesh axes {unknown} that the mesh "
                             f"{dict(mesh.shape)} does not have")
    return rules


def _fsdp_spec(shape: tuple[int, ...], mesh: jax.sharding.Mesh, axis: str) -> jax.sharding.PartitionSpec:
    n = mesh.shape.get(axis, 1)
    if n <= 1:
        return jax.P()
    dims = [d for d in range(len(shape)) if shape[d] % n == 0 and shape[d] >= n]
    if not dims:
        return jax.P()
    best = max(dims, key=lambda d: (shape[d], -d))
    return jax.P(*([None] * best + [axis]))


def _placed(path: str, shape: tuple[int, ...], spec: jax.sharding.PartitionSpec,
            mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    if len(spec) > len(shape):
        raise ValueError(f"{path}: spec {spec} has more entries than the array's shape {shape}")
    for dim, entry in enumerate(spec):
        if shape[dim] % axis_size(mesh, entry):
            raise ValueError(f"{path}: dimension {dim} of shape {shape} is not divisible by mesh axes "
                             f"{entry} of size {axis_size(mesh, entry)} (spec {spec})")
    return jax.sharding.NamedSharding(mesh, spec)


def _default(x: Any, mesh: jax.sharding.Mesh, fsdp_axis: str) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(mesh, _fsdp_spec(tuple(np.shape(x)), mesh, fsdp_axis))


def _by_rules(params: Any, mesh: jax.sharding.Mesh, rules: list[_tree.Rule], fsdp_axis: str) -> Any:
    """Shardings of every array of ``params``: the first rule matching its path, else the FSDP default."""
    pick = _tree.PathRules(rules, what="sharding rules") if rules else None

    def one(keypath, x):
        path = _tree.path_str(keypath)
        spec = None if pick is None else pick(path)
        return _default(x, mesh, fsdp_axis) if spec is None else _placed(path, tuple(np.shape(x)), spec, mesh)

    out = jax.tree_util.tree_map_with_path(one, params)
    if pick is not None:
        pick.check()
    return out


def _mirroring(state: Any, params: Any, shardings: Any, mesh: jax.sharding.Mesh, fsdp_axis: str) -> Any:
    """Shardings of a training state: ``params`` and every subtree with their structure (optimizer
    moments, masks) take the params' shardings where shapes agree; other arrays get the FSDP default."""
    treedef: Any = jax.tree.structure(params)  # Any: jax's PyTreeDef alias does not resolve for mypy
    shapes = [np.shape(x) for x in jax.tree.leaves(params)]
    placed = jax.tree.leaves(shardings)

    def mirrors(x: Any) -> bool:
        try:
            treedef.flatten_up_to(x)
        except (ValueError, TypeError):
            return False
        return True

    def one(x: Any) -> Any:
        if not mirrors(x):
            return _default(x, mesh, fsdp_axis)
        return treedef.unflatten([like(a, shape, s) for a, shape, s in zip(treedef.flatten_up_to(x), shapes, placed)])

    def like(subtree: Any, shape: tuple[int, ...], sharding: Any) -> Any:
        """``sharding`` for the arrays of ``subtree`` shaped like the parameter, the default for others."""
        return jax.tree.map(lambda leaf: sharding if np.shape(leaf) == shape else _default(leaf, mesh, fsdp_axis),
                            subtree)

    return jax.tree.map(one, state, is_leaf=mirrors)


def param_shardings(params: Any, mesh: jax.sharding.Mesh, rules: Rules = (), *,
                    fsdp_axis: str = "fsdp") -> Any:
    """``NamedSharding`` per array of ``params`` (any pytree, or a whole ``TrainState``).

    Rules ``[jb.tree.Rule(regex, jax.P(...)), ...]`` follow :mod:`jaxopt_big.tree`: a pattern fully
    matches an array's path or a module path above it (``"Dense_0"`` places every array of that
    layer; arrays inside compressed leaves have paths such as ``Dense_0/kernel/values``); the first
    match wins; a rule that places nothing raises. For a training state (an object with a ``params``
    field, such as :class:`jaxopt_big.train.TrainState`) the rules read paths *relative to its
    params*, and every subtree of the state with the params' structure (Adam moments, prune masks)
    takes the same sharding as the parameter it mirrors. An array no rule matches gets the FSDP
    default: its largest dimension divisible by the ``fsdp`` axis size is split over that axis
    (replicated when none is, or when the mesh has no ``fsdp`` axis larger than 1).

    Raises:
      ValueError: a rule names an axis the mesh lacks, matches no array, or splits a dimension that
        is not divisible by its mesh axes (the message names the path, shape and spec).

    Examples:
      >>> from jaxopt_big.parallel._mesh import make_mesh
      >>> mesh = make_mesh(data=2, fsdp=4)
      >>> sh = param_shardings({"d": {"kernel": jax.numpy.zeros((8, 6)), "bias": jax.numpy.zeros(6)}}, mesh)
      >>> sh["d"]["kernel"].spec, sh["d"]["bias"].spec
      (P('fsdp',), P())
    """
    rules = _check_rules(rules, mesh)
    inner = None if isinstance(params, Mapping) else getattr(params, "params", None)
    if inner is None:
        return _by_rules(params, mesh, rules, fsdp_axis)
    return _mirroring(params, inner, _by_rules(inner, mesh, rules, fsdp_axis), mesh, fsdp_axis)


def shard_params(params: Any, mesh: jax.sharding.Mesh, rules: Rules = (), *, fsdp_axis: str = "fsdp") -> Any:
    """Places ``params`` (or a whole ``TrainState``) on ``mesh`` by :func:`param_shardings`.

    Examples:
      >>> from jaxopt_big.parallel._mesh import make_mesh
      >>> mesh = make_mesh(data=2, tensor=4)
      >>> p = shard_params({"w": jax.numpy.zeros((4, 8))}, mesh, [_tree.Rule("w", jax.P(None, "tensor"))])
      >>> p["w"].sharding.spec
      P(None, 'tensor')
    """
    return jax.device_put(params, param_shardings(params, mesh, rules, fsdp_axis=fsdp_axis))
