"""The one Hugging Face safetensors reader and writer that the BERT and Llama loaders share.

A checkpoint folder holds ``model.safetensors`` or a sharded ``model.safetensors.index.json`` with the
shards it lists. When both are there the single file wins, as in ``transformers``. Every defect of
the files (corrupt, truncated or empty safetensors, an index that is not JSON, has no ``weight_map``
or points at the wrong shard, a tensor that is not floating point) is a ``ValueError`` of one line
that names the file; ``safetensors`` is imported only when a checkpoint is read or written.
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Checkpoint", "Lazy", "write", "read_config", "required", "SINGLE", "INDEX"]

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def read_config(directory: pathlib.Path) -> dict[str, Any]:
    """``directory/config.json`` as a dict; invalid JSON (or not an object) is a ValueError naming the file."""
    file = directory / "config.json"
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(config).__name__}")
    return config


def required(config: dict[str, Any], key: str) -> Any:
    """``config[key]``; a missing field is a ValueError naming it (not a KeyError)."""
    if key not in config:
        raise ValueError(f"config.json: required field {key!r} is missing")
    return config[key]


def _open(file: pathlib.Path) -> Any:
    """``safe_open`` of ``file``; a file safetensors cannot read is a ValueError naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(file), framework="numpy")
    except SafetensorError as e:
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from None


def _weight_map(index: pathlib.Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{index}: not valid JSON ({e})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: no 'weight_map' object of tensor name -> shard file")
    return weight_map


class Checkpoint:
    """The tensors of a checkpoint folder, read lazily one at a time.

    Args:
      directory: the folder.
      ignored: full-match regexes of tensor names the model recomputes or does not use (a pooler,
        RoPE tables); :meth:`check_all_used` does not count them.

    Raises:
      FileNotFoundError: neither file, or a shard the index lists, exists.
      ValueError: a file is not readable safetensors, the index is not valid, or a shard lacks a
        tensor the index places in it.
    """

    def __init__(self, directory: str | pathlib.Path, *, ignored: Iterable[str] = ()):
        self.directory = directory = pathlib.Path(directory)
        single, index = directory / SINGLE, directory / INDEX
        if single.exists():
            self.files = {name: single for name in self._keys(single)}
        elif index.exists():
            self.files = {name: directory / shard for name, shard in _weight_map(index).items()}
            for shard in sorted(set(self.files.values())):
                if not shard.is_file():
                    raise FileNotFoundError(f"{index}: lists shard {shard.name}, which does not exist")
                absent = sorted(n for n, f in self.files.items() if f == shard and n not in self._keys(shard))
                if absent:
                    raise ValueError(f"{index}: places {absent[:4]}{'...' if len(absent) > 4 else ''} in "
                                     f"{shard.name}, which does not hold them")
        else:
            raise FileNotFoundError(f"{directory}: neither {SINGLE} nor {INDEX}")
        self.ignored = re.compile("|".join(f"(?:{p})" for p in ignored) or "(?!)")
        self.used: set[str] = set()

    @staticmethod
    def _keys(file: pathlib.Path) -> set[str]:
        with _open(file) as f:
            return set(f.keys())

    def get(self, name: str, path: str) -> np.ndarray:
        """Tensor ``name`` (for the model leaf ``path``), which must be floating point."""
        from safetensors import SafetensorError

        if name not in self.files:
            raise ValueError(f"{self.directory}: tensor {name!r} (for {path}) is missing")
        self.used.add(name)
        file = self.files[name]
        try:
            with _open(file) as f:
                value = f.get_tensor(name)
        except SafetensorError as e:
            raise ValueError(f"{file}: tensor {name!r} cannot be read ({e})") from None
        if not jnp.issubdtype(value.dtype, jnp.floating):
            raise ValueError(f"{file}: tensor {name!r} (for {path}) has dtype {value.dtype}; "
                             "a floating-point weight is expected")
        return value

    def lazy(self, name: str, path: str, shape: tuple[int, ...], transpose: bool, dtype: Any) -> Lazy:
        """A handle on tensor ``name`` (for the model leaf ``path``) that reads it only when asked:
        its shape and dtype come from the file's header now, checked against ``shape``."""
        if name not in self.files:
            raise ValueError(f"{self.directory}: tensor {name!r} (for {path}) is missing")
        self.used.add(name)
        file = self.files[name]
        entry = _header(file).get(name)
        if not isinstance(entry, dict) or entry.get("dtype") not in _DTYPES:
            kind = entry.get("dtype") if isinstance(entry, dict) else None
            raise ValueError(f"{file}: tensor {name!r} (for {path}) has dtype {kind}; "
                             "a floating-point weight is expected")
        stored = tuple(entry["shape"])
        if (stored[::-1] if transpose else stored) != shape:
            raise ValueError(f"{path}: tensor {name!r} has shape {stored[::-1] if transpose else stored} "
                             f"(transposed: {transpose}), expected {shape}")
        return Lazy(shape, dtype, source=lambda: self.read(name, path), transpose=transpose, path=path)

    def read(self, name: str, path: str) -> np.ndarray:
        """Tensor ``name`` as stored (bfloat16 stays bfloat16), read from its offset into a fresh buffer:
        no memory map, so nothing but this tensor counts in the process's resident memory."""
        file = self.files[name]
        header_bytes, header = _header_size(file), _header(file)
        entry = header[name]
        start, end = entry["data_offsets"]
        with file.open("rb") as stream:
            stream.seek(8 + header_bytes + start)
            data = stream.read(end - start)
        if len(data) != end - start:
            raise ValueError(f"{file}: tensor {name!r} (for {path}) is truncated")
        return np.frombuffer(data, _DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def check_all_used(self) -> None:
        """Raises ValueError naming the tensors no leaf read (another architecture, more layers, a head)."""
        left = sorted(n for n in set(self.files) - self.used if not self.ignored.fullmatch(n))
        if left:
            raise ValueError(f"checkpoint tensors {left[:8]}{'...' if len(left) > 8 else ''} have no place "
                             "in the model (another architecture, more layers than config.json, or a head?)")


_DTYPES = {"F16": np.dtype("float16"), "BF16": np.dtype(jnp.bfloat16), "F32": np.dtype("float32"),
           "F64": np.dtype("float64")}


def _header_size(file: pathlib.Path) -> int:
    with file.open("rb") as stream:
        return int.from_bytes(stream.read(8), "little")


def _header(file: pathlib.Path) -> dict[str, Any]:
    """The JSON header of a safetensors file: ``{name: {dtype, shape, data_offsets}}``."""
    with file.open("rb") as stream:
        size = int.from_bytes(stream.read(8), "little")
        try:
            header = json.loads(stream.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file}: not a readable safetensors file (header: {e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{file}: not a readable safetensors file (header is not an object)")
    return header


class Lazy(jax.ShapeDtypeStruct):
    """A checkpoint tensor not read yet: a ``jax.ShapeDtypeStruct`` (so shape-only code, such as
    ``jax.eval_shape``, takes it as it is) that :meth:`read` reads, as the model's float array.

    The one-shot engine reads a block's lazy leaves when it reaches the block
    (``jb.oneshot.compress``), so a checkpoint is compressed holding one float block at a time.
    """

    def __init__(self, shape: tuple[int, ...], dtype: Any, *, source: Callable[[], np.ndarray], transpose: bool,
                 path: str):
        super().__init__(shape, dtype)
        self.source, self.transpose, self.path = source, transpose, path

    def read(self) -> jax.Array:
        """The tensor in the model's layout and dtype; a NaN or Inf value is a ValueError naming it."""
        value = self.source()
        bad = int(value.size - np.count_nonzero(np.isfinite(value)))
        if bad:
            raise ValueError(f"weight {self.path} has {bad} NaN or Inf value{'s' * (bad > 1)} in the checkpoint")
        return jnp.asarray(np.ascontiguousarray(value.T if self.transpose else value, dtype=self.dtype))

    def __repr__(self) -> str:
        return f"Lazy({self.path}, {self.shape}, {self.dtype})"


def write(directory: str | pathlib.Path, tensors: dict[str, np.ndarray]) -> None:
    """Writes ``tensors`` as ``directory/model.safetensors``, removing a sharded checkpoint there.

    A stale ``model.safetensors.index.json`` (and the shards it lists) would otherwise stand beside
    the new file; readers that prefer the index would load the old weights.
    """
    from safetensors.numpy import save_file

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / SINGLE), metadata={"format": "pt"})
    index = directory / INDEX
    if index.exists():
        try:
            shards = set(_weight_map(index).values())
        except ValueError:  # an unreadable index lists nothing we can trust to delete
            shards = set()
        for shard in shards:
            file = directory / shard
            if file.parent == directory and file.name != SINGLE and file.suffix == ".safetensors":
                file.unlink(missing_ok=True)
        index.unlink()
