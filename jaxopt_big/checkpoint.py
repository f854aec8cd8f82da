"""Orbax checkpoints of training states, compressed leaves included.

Compressed leaves (``QArray``, ``LowRank``, ``PackedSparse``, ...) are ``flax.struct`` pytrees: their
arrays are saved as they are stored (int8 values, factors, packed indices), so a compressed
checkpoint is really smaller on disk. Their class and static fields (``bits``, ``dense_shape``, ...)
are saved beside the arrays as JSON: a restore target must agree with them as it must agree with
array shapes, and a restore without a target rebuilds the compressed leaves from them.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import json
import math
import os
import pathlib
import re
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxopt_big import _checks
from jaxopt_big import leaves as _leaves
from jaxopt_big import tree as _tree

__all__ = ["Manager", "abstract", "disk_bytes"]

_STRUCTURE = "structure"  # the JSON item recording compressed leaves beside the "state" item


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
    def one(x, sharding):
        if not hasattr(x, "dtype"):  # a Python scalar stays as it is
            return x
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding or getattr(x, "sharding", None))

    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: one(x, shardings), tree)
    return jax.tree.map(one, tree, shardings)


def _abstract_storable(like: Any) -> Any:
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def one(x):
        if not hasattr(x, "dtype"):  # a Python scalar: Orbax restores the saved value as it is
            return x
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
    """``{path: (shape, dtype)}`` with every key in the path: Orbax's metadata keeps the ``value`` of an
    nnx Variable (``kernel/value``), which :func:`jaxopt_big.tree.path_str` leaves out."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    dtype = lambda x: x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype  # Python scalars too
    return {"/".join(str(_key(k)) for k in p): (tuple(np.shape(x)), str(np.dtype(dtype(x)))) for p, x in flat}


# Static fields of compressed leaves as JSON: plain values as they are, the rest tagged by kind.
# Classes are looked up among the modules already imported; only jaxopt_big's own are imported
# by a name read from disk.

def _class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _lookup(name: str, is_kind: Any) -> Any:
    module_name, qualname = name.split(":")
    module = sys.modules.get(module_name)
    if module is None and module_name.split(".")[0] == __name__.split(".")[0]:
        module = importlib.import_module(module_name)
    found = module
    for part in qualname.split(".") if module is not None else ():
        found = getattr(found, part, None)
    if module is None or found is None or not is_kind(found):
        raise ValueError(f"the checkpoint holds a {name}, which is not loaded: import the module that defines it, "
                         "or restore with like=")
    return found


def _encode(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return {type(value).__name__: [_encode(v) for v in value]}
    if isinstance(value, np.dtype):
        return {"dtype": value.name}
    if isinstance(value, enum.Enum):
        return {"enum": _class_name(type(value)), "name": value.name}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"dataclass": _class_name(type(value)),
                "fields": {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}}
    if isinstance(value, np.generic):
        return _encode(value.item())
    # compared as text (without memory addresses, which differ between processes); not rebuildable
    return {"repr": re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))}


def _decode(data: Any) -> Any:
    if not isinstance(data, dict):
        return data
    if "tuple" in data or "list" in data:
        kind, values = next(iter(data.items()))
        return {"tuple": tuple, "list": list}[kind](_decode(v) for v in values)
    if "dtype" in data:
        return jnp.dtype(data["dtype"])
    if "enum" in data:
        return _lookup(data["enum"], lambda c: isinstance(c, type) and issubclass(c, enum.Enum))[data["name"]]
    if "dataclass" in data:
        cls = _lookup(data["dataclass"], dataclasses.is_dataclass)
        return cls(**{k: _decode(v) for k, v in data["fields"].items()})
    raise ValueError(f"a static field saved as {data['repr']} cannot be rebuilt: restore with like=")


def _show(data: Any) -> str:
    try:
        return repr(_decode(data))
    except ValueError:  # not rebuildable here: show what was saved
        return data.get("repr", json.dumps(data))


def _same(saved: dict[str, Any], wanted: dict[str, Any], name: str) -> bool:
    text = lambda data: json.dumps(data, sort_keys=True)  # NaN equals NaN here, as it does on disk
    return name in saved and name in wanted and text(saved[name]) == text(wanted[name])


def _fields(leaf: Any) -> list[dataclasses.Field]:
    return list(dataclasses.fields(leaf)) if dataclasses.is_dataclass(leaf) else []


def _record(leaf: Any) -> dict[str, Any]:
    """Class, static fields and nested compressed children of one compressed leaf, as JSON."""
    fields = _fields(leaf)
    return {"class": _class_name(type(leaf)),
            "static": {f.name: _encode(getattr(leaf, f.name))
                       for f in fields if not f.metadata.get("pytree_node", True)},
            "nested": {f.name: _record(getattr(leaf, f.name)) for f in fields
                       if f.metadata.get("pytree_node", True) and _leaves.is_compressed(getattr(leaf, f.name))}}


def _key(entry: Any) -> Any:
    for attribute in ("key", "name", "idx"):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
        if hasattr(entry, attribute):
            value = getattr(entry, attribute)
            return value if isinstance(value, (int, str)) else str(value)
    return str(entry)


def _structure(tree: Any) -> dict[str, Any]:
    """``{path: record + keys}`` of the compressed leaves of ``tree`` (what is saved beside the state)."""
    return {_tree.path_str(p): {"keys": [_key(k) for k in p], **_record(x)}
            for p, x in _leaves.leaves_with_path(tree) if _leaves.is_compressed(x)}


def _static_differences(saved: dict[str, Any], leaf: Any, prefix: str = "") -> list[str]:
    """What differs between a saved record and a target's compressed leaf, field by field."""
    if not _leaves.is_compressed(leaf) or saved["class"] != _class_name(type(leaf)):
        target = _class_name(type(leaf)) if _leaves.is_compressed(leaf) else "plain arrays"
        return [f"{prefix}class: checkpoint {saved['class']} vs target {target}"]
    wanted = _record(leaf)
    saved_value = lambda name: _show(saved["static"][name]) if name in saved["static"] else "no such field"
    wanted_value = lambda name: repr(getattr(leaf, name)) if name in wanted["static"] else "no such field"
    defaults = {f.name: f.default for f in _fields(leaf)}  # a field newer than the checkpoint: saved as its default
    out = [f"{prefix}{name}: checkpoint {saved_value(name)} vs target {wanted_value(name)}"
           for name in sorted(set(saved["static"]) | set(wanted["static"]))
           if not _same(saved["static"], wanted["static"], name)
           and not (name not in saved["static"] and getattr(leaf, name) == defaults.get(name, dataclasses.MISSING))]
    for name in sorted(set(saved["nested"]) | set(wanted["nested"])):
        if name not in saved["nested"]:
            out.append(f"{prefix}{name}: checkpoint plain arrays vs target {wanted['nested'][name]['class']}")
        else:
            out += _static_differences(saved["nested"][name], getattr(leaf, name), f"{prefix}{name}.")
    return out


def _compressed_differences(saved: dict[str, Any], target: Any) -> list[str]:
    leaves = {_tree.path_str(p): x for p, x in _leaves.leaves_with_path(target)}
    out = [f"{path}: {type(leaves[path]).__name__} " + "; ".join(diffs) for path in sorted(set(saved) & set(leaves))
           if (diffs := _static_differences(saved[path], leaves[path]))]
    return out + [f"{path}: class: checkpoint plain arrays vs target {type(leaves[path]).__name__}"
                  for path in sorted(set(leaves) - set(saved)) if _leaves.is_compressed(leaves[path])]


def _rebuild(record: dict[str, Any], raw: Any) -> Any:
    """The compressed leaf a raw restore (a dict of its children by field name) stands for."""
    cls = _lookup(record["class"], lambda c: isinstance(c, type) and issubclass(c, _leaves.Compressed))
    children = {**raw, **{name: _rebuild(nested, raw[name]) for name, nested in record["nested"].items()}}
    return cls(**children, **{name: _decode(v) for name, v in record["static"].items()})


def _index(node: Any, key: Any) -> Any:
    """Orbax restores sequences as lists and other nodes (dicts, dataclasses, named tuples) as dicts."""
    return key if isinstance(node, list) or key in node else str(key)


def _rebuild_all(raw: Any, structure: dict[str, Any]) -> Any:
    """``raw`` (a restore without target: nested dicts and lists) with its compressed leaves rebuilt."""
    for record in structure.values():
        keys = record["keys"]
        if not keys:
            return _rebuild(record, raw)
        node = raw
        for key in keys[:-1]:
            node = node[_index(node, key)]
        last = _index(node, keys[-1])
        node[last] = _rebuild(record, node[last])
    return raw


def disk_bytes(path: str | os.PathLike) -> int:
    """Total bytes of the files under ``path`` (a checkpoint step directory, for example).

    Examples:
      >>> disk_bytes("/nonexistent")
      0
    """
    return sum(f.stat().st_size for f in pathlib.Path(path).rglob("*") if f.is_file())


def _check_json(value: Any, path: str = "extra") -> None:
    """Raises TypeError naming the first part of ``value`` that JSON would not give back as it is."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{path} has the key {k!r} ({type(k).__name__}); JSON keys must be str")
            _check_json(v, f"{path}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_json(v, f"{path}[{i}]")
    elif value is not None and not isinstance(value, (bool, int, float, str)):
        raise TypeError(f"{path} is a {type(value).__name__} ({value!r}), which JSON cannot store: convert it "
                        "(float(x), int(x), x.tolist()) before saving")


def _check_sizes(state: Any) -> None:
    """Raises ValueError naming the first zero-size array of ``state``: Orbax refuses them, but only
    once it has started writing (leaving a temporary directory, or failing in the background).
    A state without leaves is refused for the same reason."""
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    if not leaves:
        raise ValueError(f"cannot save a state without leaves ({state!r}): Orbax does not store an empty tree")
    for path, x in leaves:
        if hasattr(x, "shape") and math.prod(x.shape) == 0:
            raise ValueError(f"{_tree.path_str(path)}: cannot save a zero-size array (shape {tuple(x.shape)}); "
                             "Orbax does not store them: leave the leaf out of the saved state")


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
        if max_to_keep is not None:
            max_to_keep = _checks.integer("max_to_keep (an int >= 1 or None)", max_to_keep, low=1)
        save_interval_steps = _checks.integer("save_interval_steps", save_interval_steps, low=1)
        async_save = _checks.flag("async_save", async_save)
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"directory must be a str or os.PathLike, got {directory!r}")
        self.directory = pathlib.Path(directory).absolute()
        self.save_interval_steps = save_interval_steps
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
            "state": ocp.StandardCheckpointHandler(), "extra": ocp.JsonCheckpointHandler(),
            _STRUCTURE: ocp.JsonCheckpointHandler()})

    def save(self, step: int, state: Any, *, extra: dict[str, Any] | None = None, force: bool = False,
             overwrite: bool = False) -> bool:
        """Saves ``state`` (and JSON ``extra``, e.g. history) as ``step``.

        Args:
          step: a non-negative int (a Python, numpy or 0-d JAX integer), newer than every saved step.
          state: any pytree of arrays, Python scalars and compressed leaves.
          extra: JSON data (dicts with str keys, lists, str, numbers, bools, None), checked before
            anything is written.
          force: save even if ``step`` is not a multiple of ``save_interval_steps``.
          overwrite: replace ``step`` if it exists and delete every later step (to restart training
            from an earlier checkpoint). Without it such a save raises.

        Returns:
          True if saved, False if skipped because ``step`` is not a multiple of ``save_interval_steps``.

        Raises:
          ValueError: ``step`` is negative or not newer than the latest saved step (unless ``overwrite``),
            or ``state`` has no leaves or holds a zero-size array (the message names its path).
          TypeError: ``step`` is not an int, or ``extra`` holds something JSON cannot store (the
            message names where).

        Examples:
          >>> import tempfile, jax.numpy as jnp
          >>> mgr = Manager(tempfile.mkdtemp(), async_save=False)
          >>> mgr.save(0, {"w": jnp.ones(2)})
          True
          >>> mgr.save(0, {"w": jnp.zeros(2)})
          Traceback (most recent call last):
          ValueError: step 0 already exists in ...; pass overwrite=True to replace it
        """
        step = _checks.integer("step", step, low=0)
        if not force and step % self.save_interval_steps:
            return False
        extra = dict(extra or {})
        _check_json(extra)
        _check_sizes(state)
        self._make_room(step, overwrite)
        args = ocp.args.Composite(state=ocp.args.StandardSave(_storable(state)), extra=ocp.args.JsonSave(extra),
                                  **{_STRUCTURE: ocp.args.JsonSave(_structure(state))})
        return bool(self._manager.save(step, args=args, force=True))

    def _make_room(self, step: int, overwrite: bool) -> None:
        steps = self.all_steps()
        later = [s for s in steps if s >= step]
        if later and not overwrite:
            if step in steps:
                raise ValueError(f"step {step} already exists in {self.directory}; pass overwrite=True to replace it"
                                 + (f" (and delete the later steps {later[1:]})" if later[1:] else ""))
            raise ValueError(f"step {step} is older than the latest step {steps[-1]} in {self.directory}; pass "
                             f"overwrite=True to delete the steps {later} and save it")
        for s in later:
            self._manager.delete(s)

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

    def _unreadable(self, step: int, reason: Any) -> ValueError:
        if isinstance(reason, Exception):
            reason = f"{type(reason).__name__}: {reason}"
        return ValueError(f"checkpoint step {step} in {self.step_directory(step)} is unreadable (truncated or "
                          f"corrupt?): {reason}; other steps: {[s for s in self.all_steps() if s != step]}")

    def _item(self, step: int, name: str) -> Any:
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()}))[name]
        except Exception as e:  # noqa: BLE001 - orbax raises many kinds; say which step is broken
            raise self._unreadable(step, e) from e

    def _structure(self, step: int) -> dict[str, Any] | None:
        """The saved record of compressed leaves; None for checkpoints written before it was saved."""
        if not (self.step_directory(step) / _STRUCTURE).exists():
            return None
        return self._item(step, _STRUCTURE)

    def _check_tree(self, step: int, target: Any, like: Any, structure: dict[str, Any] | None) -> None:
        try:
            stored = self._manager.item_metadata(step)["state"]
        except Exception as e:  # noqa: BLE001
            raise self._unreadable(step, e) from e
        if stored is None:
            raise self._unreadable(step, "its state metadata (state/_METADATA) is missing")
        stored = _signature(getattr(stored, "tree", stored))
        wanted = _signature(target)
        missing = sorted(set(wanted) - set(stored))
        unexpected = sorted(set(stored) - set(wanted))
        changed = [f"{p}: checkpoint {stored[p]} vs target {wanted[p]}"
                   for p in sorted(set(stored) & set(wanted)) if stored[p] != wanted[p]]
        compressed = [] if structure is None else _compressed_differences(structure, like)
        problems = [f"{what} {found[:20]}" for what, found in [
            ("missing from checkpoint", missing), ("only in checkpoint", unexpected),
            ("shape/dtype differs", changed), ("compressed leaves differ", compressed)] if found]
        if problems:
            raise ValueError(f"restore target differs from checkpoint step {step} in {self.directory}: "
                             + ", ".join(problems))

    def restore(self, step: int | None = None, *, like: Any = None) -> Any:
        """Restores ``step`` (the latest by default).

        Args:
          step: which checkpoint.
          like: the restore target: a state (or :func:`abstract` of one) with the saved tree structure,
            and compressed leaves of the saved classes with the saved static fields. Leaves' shardings
            say where the restored arrays go, so a checkpoint saved on one mesh restores onto another.
            Without it the saved tree comes back as nested dicts and lists (named tuples and
            dataclasses become dicts) holding its arrays, Python scalars and compressed leaves; an
            ``nnx.State`` comes back as dicts with each Variable's leaf under ``"value"``
            (``{"kernel": {"value": array}}``): restore with ``like=`` to get the ``State``.

        Raises:
          FileNotFoundError: no such step (the message lists the available ones).
          ValueError: ``like`` has other paths, shapes, dtypes, compressed-leaf classes or static
            fields than the checkpoint (all listed), or the checkpoint's files are truncated or corrupt.
        """
        step = self._resolve(step)
        structure = self._structure(step)
        if like is None:
            args = ocp.args.Composite(state=ocp.args.StandardRestore())
        else:
            target = _abstract_storable(like)
            self._check_tree(step, target, like, structure)
            args = ocp.args.Composite(state=ocp.args.StandardRestore(target))
        try:
            restored = self._manager.restore(step, args=args)["state"]
        except Exception as e:  # noqa: BLE001
            raise self._unreadable(step, e) from e
        if like is not None:
            return _unstore(restored, like)
        if structure is None:
            return restored
        try:
            return _rebuild_all(restored, structure)
        except (KeyError, IndexError, TypeError) as e:
            raise self._unreadable(step, f"its compressed leaves do not fit its arrays: {type(e).__name__}: {e}") from e

    def extra(self, step: int | None = None) -> dict[str, Any]:
        """The JSON ``extra`` saved with ``step`` (the latest by default)."""
        return dict(self._item(self._resolve(step), "extra"))

    def close(self) -> None:
        """Waits for pending saves and releases Orbax's resources."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Manager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
