"""GPipe pipeline parallelism: stages on a mesh axis, microbatches passed on with ``ppermute``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_big import _checks

__all__ = ["pipeline"]


def pipeline(stage_fn: Callable[[Any, jax.Array], jax.Array], stage_params: Any, x: jax.typing.ArrayLike, *,
             mesh: jax.sharding.Mesh, microbatches: int, axis: str = "stage") -> jax.Array:
    """Runs ``stage_fn`` stage after stage with a GPipe schedule over the mesh ``axis``.

    Stage ``s`` lives on the devices at position ``s`` of ``axis`` and holds ``stage_params[s]``
    (every leaf of ``stage_params`` has a leading dimension equal to the number of stages). The batch
    is cut into ``microbatches``; at tick ``t`` stage ``s`` works on microbatch ``t - s`` and hands its
    output to stage ``s + 1`` with ``ppermute``, so ``stages + microbatches - 1`` ticks run all of
    them. The result equals ``stage_fn(p[S-1], ... stage_fn(p[0], x))`` and is differentiable
    (with respect to ``stage_params`` and ``x``). ``stage_fn`` must keep the activation's shape.

    Raises:
      ValueError: ``axis`` not in the mesh, a params leaf whose leading size is not the stage count,
        or a batch not divisible by ``microbatches``.

    Examples:
      >>> mesh = jax.make_mesh((4,), ("stage",), axis_types=(jax.sharding.AxisType.Auto,),
      ...                      devices=jax.devices()[:4])
      >>> w = jnp.stack([jnp.eye(2) * (s + 1) for s in range(4)])
      >>> pipeline(lambda w, h: h @ w, w, jnp.ones((4, 2)), mesh=mesh, microbatches=2)[0].tolist()
      [24.0, 24.0]
    """
    if axis not in mesh.axis_names:
        raise ValueError(f"pipeline axis {axis!r} is not an axis of the mesh {dict(mesh.shape)}")
    stages = mesh.shape[axis]
    for keypath, p in jax.tree_util.tree_leaves_with_path(stage_params):
        if np.ndim(p) == 0 or np.shape(p)[0] != stages:
            raise ValueError(f"stage_params{jax.tree_util.keystr(keypath)}: leading size "
                             f"{np.shape(p)[:1]} must equal the {stages} stages of axis {axis!r}")
    x = jnp.asarray(x)
    microbatches = _checks.integer("pipeline.microbatches", microbatches, low=1)
    if x.shape[0] % microbatches:
        raise ValueError(f"batch size {x.shape[0]} is not divisible by microbatches={microbatches!r}")
    xs = x.reshape(microbatches, x.shape[0] // microbatches, *x.shape[1:])
    ticks = stages + microbatches - 1
    forward = [(s, s + 1) for s in range(stages - 1)]

    def per_stage(params, xs):
        params = jax.tree.map(lambda p: p[0], params)
        stage = jax.lax.axis_index(axis)
        xs = jax.lax.pcast(xs, axis, to="varying")

        def tick(carry, t):
            incoming, outputs = carry
            fresh = jax.lax.dynamic_index_in_dim(xs, jnp.minimum(t, microbatches - 1), keepdims=False)
            out = stage_fn(params, jnp.where(stage == 0, fresh, incoming))
            done = t - (stages - 1)  # the microbatch the last stage finishes at this tick
            slot = jnp.clip(done, 0, microbatches - 1)
            keep = (stage == stages - 1) & (done >= 0)
            current = jax.lax.dynamic_index_in_dim(outputs, slot, keepdims=False)
            outputs = jax.lax.dynamic_update_index_in_dim(outputs, jnp.where(keep, out, current), slot, 0)
            return (jax.lax.ppermute(out, axis, forward), outputs), None

        start = (jnp.zeros_like(xs[0]), jnp.zeros_like(xs))
        (_, outputs), _ = jax.lax.scan(tick, start, jnp.arange(ticks))
        return jax.lax.psum(outputs, axis)  # only the last stage holds nonzero outputs

    specs = (jax.tree.map(lambda _: jax.P(axis), stage_params), jax.P())
    out = jax.shard_map(per_stage, mesh=mesh, in_specs=specs, out_specs=jax.P(), axis_names={axis})(stage_params, xs)
    return out.reshape(x.shape[0], *out.shape[2:])
