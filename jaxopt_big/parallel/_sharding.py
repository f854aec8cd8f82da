"""Placing parameters, optimizer states and batches on a mesh with ``NamedSharding``."""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np

from jaxopt_big import tree as _tree

__all__ = ["param_shardings", "shard_params", "shard_batch", "batch_sharding"]

Rules = Sequence[tuple[str, jax.sharding.PartitionSpec]]


def _spec_axes(spec: jax.sharding.PartitionSpec) -> list[str]:
    out = []
    for entry in spec:
        if entry is None:
            continue
        out.extend(entry if isinstance(entry, tuple) else (entry,))
    return out


def _axis_size(mesh: jax.sharding.Mesh, entry: Any) -> int:
    if entry is None:
        return 1
    return int(np.prod([mesh.shape[a] for a in (entry if isinstance(entry, tuple) else (entry,))]))


def _check_rules(rules: Rules, mesh: jax.sharding.Mesh) -> list[tuple[re.Pattern, str, jax.sharding.PartitionSpec]]:
    if isinstance(rules, (str, bytes)) or not all(isinstance(r, (tuple, list)) and len(r) == 2 for r in rules):
        raise TypeError(f"rules must be a sequence of (regex, PartitionSpec) pairs, got {rules!r}")
    out = []
    for pattern, spec in rules:
        if not isinstance(spec, jax.sharding.PartitionSpec):
            raise TypeError(f"rule {pattern!r}: value must be a jax.P(...) PartitionSpec, got {spec!r}")
        unknown = [a for a in _spec_axes(spec) if a not in mesh.axis_names]
        if unknown:
            raise ValueError(f"rule {pattern!r}: {spec} names mesh axes {unknown} that the mesh "
                             f"{dict(mesh.shape)} does not have")
        try:
            out.append((re.compile(pattern), pattern, spec))
        except (re.error, TypeError) as e:
            raise ValueError(f"invalid rule regex {pattern!r}: {e}") from None
    return out


def _matches(compiled: re.Pattern, path: str) -> bool:
    """Full match on the path or on any "/"-suffix (so one rule covers params and their Adam moments)."""
    parts = path.split("/")
    return any(compiled.fullmatch("/".join(parts[i:])) for i in range(len(parts)))


def _fsdp_spec(shape: tuple[int, ...], mesh: jax.sharding.Mesh, axis: str) -> jax.sharding.PartitionSpec:
    n = mesh.shape.get(axis, 1)
    if n <= 1:
        return jax.P()
    dims = [d for d in range(len(shape)) if shape[d] % n == 0 and shape[d] >= n]
    if not dims:
        return jax.P()
    best = max(dims, key=lambda d: (shape[d], -d))
    return jax.P(*([None] * best + [axis]))


def param_shardings(params: Any, mesh: jax.sharding.Mesh, rules: Rules = (), *,
                    fsdp_axis: str = "fsdp") -> Any:
    """``NamedSharding`` per array of ``params`` (any pytree, e.g. a whole ``TrainState``).

    A rule ``(regex, jax.P(...))`` applies to an array whose "/"-joined path, or any "/"-suffix of
    it, fully matches the regex; the first matching rule wins, so ``"Dense_0/kernel"`` places the
    kernel and its optimizer moments alike. Arrays inside compressed leaves have paths such as
    ``Dense_0/kernel/values``. An array no rule matches gets the FSDP default: its largest dimension
    divisible by the ``fsdp`` axis size is split over that axis (replicated when none is, or when
    the mesh has no ``fsdp`` axis larger than 1).

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
    compiled = _check_rules(rules, mesh)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    used = [False] * len(compiled)
    out = []
    for keypath, x in flat:
        path = _tree.path_str(keypath)
        shape = tuple(np.shape(x))
        spec = None
        for i, (c, _, s) in enumerate(compiled):
            if _matches(c, path):
                used[i], spec = True, s
                break
        if spec is None:
            spec = _fsdp_spec(shape, mesh, fsdp_axis)
        if len(spec) > len(shape):
            raise ValueError(f"{path}: spec {spec} has more entries than the array's shape {shape}")
        for dim, entry in enumerate(spec):
            if shape[dim] % _axis_size(mesh, entry):
                raise ValueError(f"{path}: dimension {dim} of shape {shape} is not divisible by mesh axes "
                                 f"{entry} of size {_axis_size(mesh, entry)} (spec {spec})")
        out.append(jax.sharding.NamedSharding(mesh, spec))
    for (_, pattern, _), u in zip(compiled, used):
        if not u:
            raise ValueError(f"sharding rule {pattern!r} matches no array; paths: "
                             f"{[_tree.path_str(p) for p, _ in flat][:40]}")
    return jax.tree_util.tree_unflatten(treedef, out)


def shard_params(params: Any, mesh: jax.sharding.Mesh, rules: Rules = (), *, fsdp_axis: str = "fsdp") -> Any:
    """Places ``params`` (or a whole ``TrainState``) on ``mesh`` by :func:`param_shardings`.

    Examples:
      >>> from jaxopt_big.parallel._mesh import make_mesh
      >>> mesh = make_mesh(data=2, tensor=4)
      >>> p = shard_params({"w": jax.numpy.zeros((4, 8))}, mesh, [("w", jax.P(None, "tensor"))])
      >>> p["w"].sharding.spec
      P(None, 'tensor')
    """
    return jax.device_put(params, param_shardings(params, mesh, rules, fsdp_axis=fsdp_axis))


def batch_sharding(mesh: jax.sharding.Mesh, axes: Sequence[str] = ("data", "fsdp")) -> jax.sharding.NamedSharding:
    """Sharding of a batch's leading dimension over the mesh ``axes`` (those larger than 1).

    Examples:
      >>> from jaxopt_big.parallel._mesh import make_mesh
      >>> batch_sharding(make_mesh(data=4, fsdp=2)).spec
      P(('data', 'fsdp'),)
    """
    unknown = [a for a in axes if a not in mesh.axis_names]
    if unknown:
        raise ValueError(f"batch axes {unknown} are not axes of the mesh {dict(mesh.shape)}")
    used = tuple(a for a in axes if mesh.shape[a] > 1)
    return jax.sharding.NamedSharding(mesh, jax.P(used) if used else jax.P())


def shard_batch(batch: Any, mesh: jax.sharding.Mesh, axes: Sequence[str] = ("data", "fsdp")) -> Any:
    """Splits every leaf's leading (batch) dimension over the mesh ``axes``.

    With several processes (``jax.distributed``) each process passes its own part of the global
    batch (``global / process_count`` rows) and gets back the global array.

    Raises:
      ValueError: a leaf's leading size is not divisible by the devices it is split over.

    Examples:
      >>> from jaxopt_big.parallel._mesh import make_mesh
      >>> x = shard_batch(np.zeros((16, 3)), make_mesh(data=8))
      >>> x.sharding.spec, x.addressable_shards[0].data.shape
      (P('data',), (2, 3))
    """
    sharding = batch_sharding(mesh, axes)
    size = _axis_size(mesh, sharding.spec[0] if len(sharding.spec) else None)
    procs = jax.process_count()
    local = max(size // procs, 1)

    def put(keypath, x):
        n = np.shape(x)[0] if np.ndim(x) else None
        if n is None or n % local:
            raise ValueError(f"batch leaf {_tree.path_str(keypath) or '<root>'}: leading size {n} is not divisible "
                             f"by the mesh's batch axes {tuple(axes)} of size {size}"
                             + (f" / {procs} processes" if procs > 1 else ""))
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        if procs > 1:
            return jax.make_array_from_process_local_data(sharding, np.asarray(x))
        return jax.device_put(x, sharding)
    return jax.tree_util.tree_map_with_path(put, batch)
