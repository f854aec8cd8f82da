"""Orbax checkpoints of training states, compressed leaves included.

Compressed leaves (``QArray``, ``LowRank``, ``PackedSparse``, ...) are ``flax.struct`` pytrees: their
arrays are saved as they are stored (int8 values, factors, packed indices), so a compressed
checkpoint is really smaller on disk, and their static fields come back from the restore target.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxopt_big import tree as _tree

__all__ = ["Manager", "abstract", "disk_bytes"]


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _storable(tree: Any) -> Any:
    """Typed PRNG keys become their raw uint32 data (what Orbax can write)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def abstract(tree: Any, shardings: Any = None) -> Any:
    """``jax.ShapeDtypeStruct`` twin of ``tree`` to restore into, with ``shardings`` (a matching tree
    of shardings, or one sharding for all leaves) or else each leaf's own sharding.

    Examples:
      >>> import jax.numpy as jnp
      >>> abstract({"w": jnp.zeros((2, 3))})["w"].shape
      (2, 3)
    """
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                                           sharding=shardings or getattr(x, "sharding", None)), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)


def _abstract_storable(like: Any) -> Any:
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def one(x):
        sharding = getattr(x, "sharding", None) or default
        if _is_key(x):
            data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(np.shape(x), x.dtype))
            spec = sharding.spec if isinstance(sharding, jax.sharding.NamedSharding) else None
            if spec is not None:
                sharding = jax.sharding.NamedSharding(sharding.mesh, jax.P(*spec, None))
            return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)
    return jax.tree.map(one, like)


def _key_impl(x: Any) -> Any:
    return jax.random.key_impl(x) if isinstance(x, jax.Array) else x.dtype._impl  # abstract key: no public accessor


def _unstore(restored: Any, like: Any) -> Any:
    return jax.tree.map(lambda r, x: jax.random.wrap_key_data(r, impl=_key_impl(x)) if _is_key(x) else r,
                        restored, like)


def _signature(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_tree.path_str(p): (tuple(x.shape), str(np.dtype(x.dtype))) for p, x in flat}


def disk_bytes(path: str | os.PathLike) -> int:
    """Total bytes of the files under ``path`` (a checkpoint step directory, for example).

    Examples:
      >>> disk_bytes("/nonexistent")
      0
    """
    return sum(f.stat().st_size for f in pathlib.Path(path).rglob("*") if f.is_file())


class Manager:
    """Saves and restores training states (any pytree) under ``directory``, one subdirectory per step.

    Args:
      directory: where the checkpoints live (created if missing).
      max_to_keep: keep only the newest this many checkpoints (all when None).
      async_save: write in a background thread; ``save`` returns once the arrays are copied to host.
      save_interval_steps: ``save`` skips steps that are not multiples of this (unless ``force``).

    Examples:
      >>> import tempfile, jax.numpy as jnp
      >>> with Manager(tempfile.mkdtemp(), max_to_keep=2) as mgr:
      ...     _ = [mgr.save(s, {"w": jnp.full(2, float(s))}) for s in (1, 2, 3)]
      ...     mgr.all_steps(), mgr.restore(like={"w": jnp.zeros(2)})["w"].tolist()
      ([2, 3], [3.0, 3.0])
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = None, async_save: bool = True,
                 save_interval_steps: int = 1):
        if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep < 1):
            raise ValueError(f"max_to_keep must be a positive int or None, got {max_to_keep!r}")
        if not isinstance(save_interval_steps, int) or save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be a positive int, got {save_interval_steps!r}")
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                               save_interval_steps=save_interval_steps)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
            "state": ocp.StandardCheckpointHandler(), "extra": ocp.JsonCheckpointHandler()})

    def save(self, step: int, state: Any, *, extra: dict[str, Any] | None = None, force: bool = False) -> bool:
        """Saves ``state`` (and JSON-serializable ``extra``, e.g. history) as ``step``; True if saved.

        Examples:
          >>> import tempfile, jax.numpy as jnp
          >>> Manager(tempfile.mkdtemp(), async_save=False).save(0, {"w": jnp.ones(2)})
          True
        """
        args = ocp.args.Composite(state=ocp.args.StandardSave(_storable(state)),
                                  extra=ocp.args.JsonSave(dict(extra or {})))
        return bool(self._manager.save(int(step), args=args, force=force))

    def wait(self) -> None:
        """Blocks until background saves are on disk."""
        self._manager.wait_until_finished()

    def all_steps(self) -> list[int]:
        """Steps with a complete checkpoint, oldest first (unfinished writes are not listed)."""
        self.wait()
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete step, or None when there is none.

        Examples:
          >>> import tempfile
          >>> Manager(tempfile.mkdtemp()).latest_step() is None
          True
        """
        steps = self.all_steps()
        return steps[-1] if steps else None

    def step_directory(self, step: int) -> pathlib.Path:
        """The directory of one step's checkpoint."""
        return self.directory / str(int(step))

    def _resolve(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
            return steps[-1]
        if int(step) not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; available steps: {steps}")
        return int(step)

    def _unreadable(self, step: int, e: Exception) -> ValueError:
        return ValueError(f"checkpoint step {step} in {self.step_directory(step)} is unreadable (truncated or "
                          f"corrupt?): {type(e).__name__}: {e}; other steps: "
                          f"{[s for s in self.all_steps() if s != step]}")

    def _check_tree(self, step: int, target: Any) -> None:
        try:
            stored = self._manager.item_metadata(step)["state"]
        except Exception as e:  # noqa: BLE001 - orbax raises many kinds; say which step is broken
            raise self._unreadable(step, e) from e
        stored = _signature(getattr(stored, "tree", stored))
        wanted = _signature(target)
        missing = sorted(set(wanted) - set(stored))
        unexpected = sorted(set(stored) - set(wanted))
        changed = [f"{p}: checkpoint {stored[p]} vs target {wanted[p]}"
                   for p in sorted(set(stored) & set(wanted)) if stored[p] != wanted[p]]
        if missing or unexpected or changed:
            raise ValueError(f"restore target differs from checkpoint step {step} in {self.directory}: "
                             f"missing from checkpoint {missing[:20]}, only in checkpoint {unexpected[:20]}, "
                             f"shape/dtype differs {changed[:20]}")

    def restore(self, step: int | None = None, *, like: Any = None) -> Any:
        """Restores ``step`` (the latest by default).

        Args:
          step: which checkpoint.
          like: the restore target: a state (or :func:`abstract` of one) with the saved tree structure.
            Leaves' shardings say where the restored arrays go, so a checkpoint saved on one mesh
            restores onto another. Without it the raw nested dicts come back.

        Raises:
          FileNotFoundError: no such step (the message lists the available ones).
          ValueError: ``like`` has other paths, shapes or dtypes than the checkpoint (all listed),
            or the checkpoint's files are truncated or corrupt.
        """
        step = self._resolve(step)
        if like is None:
            args = ocp.args.Composite(state=ocp.args.StandardRestore())
        else:
            target = _abstract_storable(like)
            self._check_tree(step, target)
            args = ocp.args.Composite(state=ocp.args.StandardRestore(target))
        try:
            restored = self._manager.restore(step, args=args)["state"]
        except Exception as e:  # noqa: BLE001
            raise self._unreadable(step, e) from e
        return restored if like is None else _unstore(restored, like)

    def extra(self, step: int | None = None) -> dict[str, Any]:
        """The JSON ``extra`` saved with ``step`` (the latest by default)."""
        step = self._resolve(step)
        try:
            return dict(self._manager.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))["extra"])
        except Exception as e:  # noqa: BLE001
            raise self._unreadable(step, e) from e

    def close(self) -> None:
        """Waits for pending saves and releases Orbax's resources."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "Manager":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
