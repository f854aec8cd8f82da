"""Per-leaf compression summary: sparsity, bits, bytes, FLOPs and compression ratio.

Compressed leaves describe themselves through the :mod:`jaxopt_big.leaves` protocol; the report
never asks what type a leaf is.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from jaxopt_big import leaves as _leaves
from jaxopt_big import tree as _tree

__all__ = ["Row", "Report", "summary"]


@dataclasses.dataclass(frozen=True)
class Row:
    """One leaf of the report. ``dense_bytes`` is what the leaf would take as a dense array."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    kind: str
    params: int
    nonzero: float | None
    bits: float
    nbytes: int
    dense_bytes: int
    flops: int | None

    @property
    def ratio(self) -> float:
        return self.dense_bytes / self.nbytes if self.nbytes else math.inf


def _describe(x: Any) -> _leaves.Description:
    if _leaves.is_compressed(x):
        return x.describe()
    shape, dtype = tuple(np.shape(x)), np.dtype(getattr(x, "dtype", np.asarray(x).dtype))
    nonzero = None
    if isinstance(x, (jax.Array, np.ndarray)) and not isinstance(x, jax.core.Tracer):
        nonzero = float(np.count_nonzero(np.asarray(x))) / max(math.prod(shape), 1)
    return _leaves.Description(kind="dense", shape=shape, dtype=dtype, bits=8.0 * dtype.itemsize, nonzero=nonzero)


def _row(path: str, x: Any) -> Row:
    d = _describe(x)
    size = math.prod(d.shape)
    dense_bytes = size * np.dtype(d.dtype).itemsize
    flops = d.flops if d.flops is not None else (2 * size if len(d.shape) >= 2 else None)
    return Row(path=path, shape=tuple(d.shape), dtype=str(np.dtype(d.dtype)), kind=d.kind, params=size,
               nonzero=d.nonzero, bits=d.bits, nbytes=_leaves.leaf_nbytes(x), dense_bytes=dense_bytes, flops=flops)


@dataclasses.dataclass(frozen=True)
class Report:
    """Rows per leaf plus totals; ``str()`` is an aligned table, ``to_markdown()`` a markdown one."""

    rows: tuple[Row, ...]

    @property
    def totals(self) -> dict[str, float]:
        params = sum(r.params for r in self.rows)
        known = [r for r in self.rows if r.nonzero is not None]
        nbytes = sum(r.nbytes for r in self.rows)
        dense = sum(r.dense_bytes for r in self.rows)
        return {
            "params": params,
            "nonzero": (sum(r.nonzero * r.params for r in known) / max(sum(r.params for r in known), 1)
                        if known else None),
            "nbytes": nbytes,
            "dense_bytes": dense,
            "ratio": dense / nbytes if nbytes else math.inf,
            "flops": sum(r.flops or 0 for r in self.rows),
        }

    _HEADER = ("path", "shape", "dtype", "kind", "params", "nonzero", "bits", "bytes", "ratio", "flops")

    def _cells(self) -> list[tuple[str, ...]]:
        def fmt(r: Row) -> tuple[str, ...]:
            nz = "-" if r.nonzero is None else f"{r.nonzero:.3f}"
            return (r.path, "x".join(map(str, r.shape)) or "()", r.dtype, r.kind, f"{r.params:,}", nz,
                    f"{r.bits:.2f}", f"{r.nbytes:,}", f"{r.ratio:.2f}x", "-" if r.flops is None else f"{r.flops:,}")
        t = self.totals
        nz = "-" if t["nonzero"] is None else f"{t['nonzero']:.3f}"
        bits = 8 * t["nbytes"] / max(t["params"], 1)
        total = ("total", "", "", "", f"{t['params']:,}", nz, f"{bits:.2f}", f"{t['nbytes']:,}",
                 f"{t['ratio']:.2f}x", f"{t['flops']:,}")
        return [fmt(r) for r in self.rows] + [total]

    def __str__(self) -> str:
        cells = [self._HEADER, *self._cells()]
        widths = [max(len(c[i]) for c in cells) for i in range(len(self._HEADER))]
        lines = ["  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                 for row in cells]
        lines.insert(1, "-" * len(lines[0]))
        lines.insert(len(lines) - 1, "-" * len(lines[0]))
        return "\n".join(lines)

    def to_markdown(self) -> str:
        rows = [self._HEADER, *self._cells()]
        out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
        return "\n".join(out)


def summary(tree: Any) -> Report:
    """Builds the per-leaf report of a parameter tree (dense arrays and compressed leaves).

    Examples:
      >>> import jax.numpy as jnp
      >>> r = summary({"Dense_0": {"kernel": jnp.zeros((4, 2)), "bias": jnp.ones(2)}})
      >>> r.totals["params"], r.totals["nbytes"], r.totals["nonzero"]
      (10, 40, 0.2)
    """
    return Report(tuple(_row(p, x) for p, x in zip(_tree.paths(tree), jax.tree.leaves(tree, is_leaf=_leaves.is_compressed))))
