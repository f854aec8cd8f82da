"""Placing a batch on a mesh: its leading dimension split over the data axes.

Below both :mod:`jaxopt_big.parallel` (which re-exports it) and :mod:`jaxopt_big.train` (whose mesh
step shards every batch), so that neither package imports the other to place batches.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Sequence

import jax
import numpy as np

from jaxopt_big import tree as _tree

__all__ = ["batch_sharding", "shard_batch", "axis_size"]


def axis_size(mesh: jax.sharding.Mesh, entry: Any) -> int:
    """Devices along a ``PartitionSpec`` entry: a mesh axis name, a tuple of them, or None (1)."""
    if entry is None:
        return 1
    return int(np.prod([mesh.shape[a] for a in (entry if isinstance(entry, tuple) else (entry,))]))


def batch_sharding(mesh: jax.sharding.Mesh, axes: Sequence[str] = ("data", "fsdp")) -> jax.sharding.NamedSharding:
    """Sharding of a batch's leading dimension over the mesh ``axes`` (those larger than 1).

    Examples:
      >>> from jaxopt_big.parallel import make_mesh
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
      >>> from jaxopt_big.parallel import make_mesh
      >>> x = shard_batch(np.zeros((16, 3)), make_mesh(data=8))
      >>> x.sharding.spec, x.addressable_shards[0].data.shape
      (P('data',), (2, 3))
    """
    sharding = batch_sharding(mesh, axes)
    size = axis_size(mesh, sharding.spec[0] if len(sharding.spec) else None)
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
