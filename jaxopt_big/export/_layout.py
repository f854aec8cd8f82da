"""What every export reads of a compressed Llama: its tensors under Hugging Face names, and the
integer codes, scales and zero points of its quantized kernels in the ``(out, in)`` layout of a
torch ``Linear`` weight, checked against what the target format can hold exactly.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import jax
import numpy as np

from jaxopt_big import leaves as _leaves
from jaxopt_big import quant as _quant
from jaxopt_big import tree as _tree
from jaxopt_big import zoo as _zoo

__all__ = ["Tensor", "Codes", "tensors", "codes", "atomic_file", "atomic_directory"]


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One parameter under its Hugging Face name (``model.layers.0.mlp.up_proj.weight``)."""

    name: str
    path: str       # our leaf path, for error messages
    leaf: Any       # an array or a compressed leaf, in our layout
    linear: bool    # a Linear weight: our (in, out) kernel is the transposed torch weight

    @property
    def module(self) -> str:
        """The torch module name (``model.layers.0.mlp.up_proj``)."""
        return self.name.rsplit(".", 1)[0]

    def dense(self) -> np.ndarray:
        """The dense value in the Hugging Face layout (float32 unless float16/bfloat16)."""
        value = np.asarray(_leaves.densify(self.leaf))
        return np.ascontiguousarray(value.T if self.linear else value)


@dataclasses.dataclass(frozen=True)
class Codes:
    """A quantized Linear weight as ``W[o, i] = (codes[o, i] - zero_point[o, i // group]) * scale[o, i // group]``."""

    codes: np.ndarray              # int8 (out, in)
    scale: np.ndarray              # float32 (out, in // group)
    zero_point: np.ndarray | None  # int8 like scale; None: symmetric
    group: int                     # inputs per scale
    bits: int


def _hf_name(path: str) -> tuple[str, bool]:
    *module, leaf = path.split("/")
    prefix = "" if module[0] == "lm_head" else "model."
    return prefix + ".".join(module) + (".bias" if leaf == "bias" else ".weight"), leaf == "kernel"


def tensors(model: Any, params: Any) -> list[Tensor]:
    """The parameters of an unrolled ``jb.zoo.Llama`` (``params``: its ``nnx.State`` or pure dict)
    under Hugging Face names, compressed leaves kept whole.

    Raises:
      TypeError: ``model`` is not a ``jb.zoo.Llama``. ValueError: a scanned model, one with an online
        Hadamard (``LlamaConfig.online_hadamard``), or ``params`` that are not the model's.
    """
    from flax import nnx

    if not isinstance(model, _zoo.Llama):
        raise TypeError(f"export needs a jb.zoo.Llama (Llama, Qwen2 or Mistral), got {type(model).__name__}")
    if model.scan_layers:
        raise ValueError("export needs the unrolled model: save_llama, then load_llama without scan_layers")
    if model.config.online_hadamard:
        raise ValueError("export: the model runs an online Hadamard before down_proj (jb.zoo.rotate), which other "
                         "tools do not run, so they would compute something else; rotate with "
                         "online_hadamard=False for a model they can load")
    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    flat = dict(zip(_tree.paths(params), jax.tree.leaves(params, is_leaf=_leaves.is_compressed)))
    expected = _tree.paths(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    missing, extra = sorted(set(expected) - set(flat)), sorted(set(flat) - set(expected))
    if missing or extra:
        raise ValueError(f"params do not fit the model: missing {missing[:4]}, unexpected {extra[:4]}")
    out = []
    for path in expected:
        name, linear = _hf_name(path)
        out.append(Tensor(name, path, flat[path], linear))
    return out


def codes(t: Tensor, *, instead: str) -> Codes | None:
    """The integer form of a quantized Linear weight (None for anything else).

    Raises:
      ValueError: a quantized leaf whose scales do not run per output feature and per block of
        consecutive inputs, or whose zero points are not integers; ``instead`` ends the message.
    """
    q = t.leaf
    if not isinstance(q, _quant.QArray):
        return None
    if not t.linear or len(q.dense_shape) != 2:
        raise ValueError(f"{t.path}: only 2-d Linear kernels can be stored quantized, got shape {q.dense_shape}; "
                         f"{instead}")
    d_in, d_out = q.dense_shape
    s_in, s_out = q.scale.shape
    if q.group_size is not None:
        raise ValueError(f"{t.path}: its last group of inputs is shorter ({d_in} inputs in groups of {q.group_size}), "
                         f"which the format cannot store; use a group size that divides {d_in}; {instead}")
    if s_out not in (1, d_out) or d_in % s_in:
        raise ValueError(f"{t.path}: scales of shape {q.scale.shape} do not run per output feature and per group "
                         f"of inputs of a ({d_in}, {d_out}) kernel; {instead}")

    def per_output(x: Any) -> np.ndarray:
        return np.ascontiguousarray(np.broadcast_to(np.asarray(x, np.float32), (s_in, d_out)).T)

    zero_point = None
    if q.zero_point is not None:
        zp = per_output(q.zero_point)
        if not np.array_equal(zp, np.round(zp)) or np.abs(zp).max() > 128:
            raise ValueError(f"{t.path}: zero points are not int8 integers; {instead}")
        zero_point = zp.astype(np.int8)
    return Codes(np.ascontiguousarray(np.asarray(q.int_values()).T), per_output(q.scale), zero_point,
                 d_in // s_in, q.bits)


def _partial(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(f".{path.name}.partial-{os.getpid()}")


@contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[pathlib.Path]:
    """A temporary path beside ``path``, renamed to ``path`` when the block succeeds, deleted otherwise."""
    path = pathlib.Path(path)
    tmp = _partial(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[pathlib.Path]:
    """A temporary folder beside ``path`` that becomes ``path`` when the block succeeds.

    Raises:
      FileExistsError: ``path`` exists and is not an empty folder.
    """
    path = pathlib.Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"export destination {str(path)!r} exists and is not empty")
    tmp = _partial(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if path.exists():
            path.rmdir()
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
