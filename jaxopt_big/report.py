"""Per-leaf compression summary: sparsity, bits, bytes, FLOPs and compression ratio.

Compressed leaves describe themselves through the :mod:`jaxopt_big.leaves` protocol; the report
never asks what type a leaf is.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_big import leaves as _leaves
from jaxopt_big import tree as _tree

__all__ = ["Table", "Row", "Report", "summary", "MemoryEstimate", "training_memory"]


@dataclasses.dataclass(frozen=True)
class Table:
    """Rows of text cells as a table: ``str()`` aligns them, ``to_markdown()`` writes markdown.

    Every report of the library prints through this one formatter.

    Attributes:
      header: the column names.
      rows: the cells, one tuple per row.
      right: per column, whether it is right-aligned (numbers); empty: all left-aligned.
      footer: how many last rows (totals) a rule sets off from the body.
      note: a line printed under the table (not in markdown).

    Examples:
      >>> print(Table(("layer", "bits"), (("up", "4"), ("down", "8")), right=(False, True)))
      layer  bits
      -----------
      up        4
      down      8
      >>> print(Table(("layer", "bits"), (("up", "4"),)).to_markdown())
      | layer | bits |
      |---|---|
      | up | 4 |
    """

    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    right: tuple[bool, ...] = ()
    footer: int = 0
    note: str = ""

    def __str__(self) -> str:
        cells = [self.header, *self.rows]
        widths = [max(len(c[i]) for c in cells) for i in range(len(self.header))]
        right = self.right or (False,) * len(widths)
        lines = ["  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)).rstrip()
                 for row in cells]
        rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
        lines.insert(1, rule)
        if self.footer:
            lines.insert(len(lines) - self.footer, rule)
        return "\n".join(lines + ([self.note] if self.note else []))

    def to_markdown(self) -> str:
        lines = ["| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in self.rows])


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
    planned: str | None = None  # the recipe's plan for this leaf (see summary(tree, recipe=...))

    @property
    def ratio(self) -> float:
        return self.dense_bytes / self.nbytes if self.nbytes else math.inf


def _is_key(dtype: Any) -> bool:
    return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _dtype(dtype: Any) -> Any:
    """``dtype`` as a NumPy dtype; a typed PRNG key's dtype as it is (NumPy has none for it, and its
    ``itemsize`` is the bytes of the key's data)."""
    return dtype if _is_key(dtype) else np.dtype(dtype)


def _concrete(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray)) and not isinstance(x, jax.core.Tracer)


def _describe(x: Any) -> _leaves.Description:
    if _leaves.is_compressed(x):
        d = x.describe()
        if d.nonzero is None and all(_concrete(v) for v in jax.tree.leaves(x)):
            # counted on the dense value: a zero code (of a pruned, then quantized kernel) that
            # dequantizes to exactly 0 is a zero
            d = dataclasses.replace(d, nonzero=float(jnp.count_nonzero(x.dense())) / max(math.prod(d.shape), 1))
        return d
    shape, dtype = tuple(np.shape(x)), _dtype(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype)
    nonzero = None
    if _concrete(x) and not _is_key(dtype):
        nonzero = float(np.count_nonzero(np.asarray(x))) / max(math.prod(shape), 1)
    return _leaves.Description(kind="dense", shape=shape, dtype=dtype, bits=8.0 * dtype.itemsize, nonzero=nonzero)


def _row(path: str, x: Any, planned: str | None = None) -> Row:
    d = _describe(x)
    size = math.prod(d.shape)
    dense_bytes = size * _dtype(d.dtype).itemsize
    flops = d.flops if d.flops is not None else (2 * size if len(d.shape) >= 2 else None)
    return Row(path=path, shape=tuple(d.shape), dtype=str(_dtype(d.dtype)), kind=d.kind, params=size,
               nonzero=d.nonzero, bits=d.bits, nbytes=_leaves.leaf_nbytes(x), dense_bytes=dense_bytes, flops=flops,
               planned=planned)


@dataclasses.dataclass(frozen=True)
class Report:
    """Rows per leaf plus totals; ``str()`` is an aligned table, ``to_markdown()`` a markdown one."""

    rows: tuple[Row, ...]

    @property
    def totals(self) -> dict[str, Any]:
        params = sum(r.params for r in self.rows)
        known = [(r.nonzero, r.params) for r in self.rows if r.nonzero is not None]
        nbytes = sum(r.nbytes for r in self.rows)
        dense = sum(r.dense_bytes for r in self.rows)
        return {
            "params": params,
            "nonzero": (sum(nz * n for nz, n in known) / max(sum(n for _, n in known), 1)
                        if known else None),
            "nbytes": nbytes,
            "dense_bytes": dense,
            "ratio": dense / nbytes if nbytes else math.inf,
            "flops": sum(r.flops or 0 for r in self.rows),
        }

    def table(self) -> Table:
        """The rows and a totals row as a :class:`Table` (a "planned" column when a plan was given)."""
        planned = any(r.planned for r in self.rows)
        header: tuple[str, ...] = ("path", "shape", "dtype", "kind", "params", "nonzero", "bits", "bytes", "ratio",
                                   "flops")

        def fmt(r: Row) -> tuple[str, ...]:
            nz = "-" if r.nonzero is None else f"{r.nonzero:.3f}"
            cells = (r.path, "x".join(map(str, r.shape)) or "()", r.dtype, r.kind, f"{r.params:,}", nz,
                     f"{r.bits:.2f}", f"{r.nbytes:,}", f"{r.ratio:.2f}x", "-" if r.flops is None else f"{r.flops:,}")
            return cells + (r.planned or "-",) if planned else cells
        t = self.totals
        nz = "-" if t["nonzero"] is None else f"{t['nonzero']:.3f}"
        bits = 8 * t["nbytes"] / max(t["params"], 1)
        total = ("total", "", "", "", f"{t['params']:,}", nz, f"{bits:.2f}", f"{t['nbytes']:,}",
                 f"{t['ratio']:.2f}x", f"{t['flops']:,}")
        rows = tuple(fmt(r) for r in self.rows) + (total + ("",) if planned else total,)
        header += ("planned",) if planned else ()
        return Table(header, rows, right=tuple(i >= 4 for i in range(len(header))), footer=1)

    def __str__(self) -> str:
        return str(self.table())

    def as_dicts(self) -> list[dict[str, Any]]:
        """The rows as JSON-ready dicts (saved next to a checkpoint; see :meth:`from_dicts`)."""
        return [dataclasses.asdict(r) for r in self.rows]

    @classmethod
    def from_dicts(cls, rows: list[dict[str, Any]]) -> Report:
        """Inverse of :meth:`as_dicts`.

        Examples:
          >>> import jax.numpy as jnp
          >>> r = summary({"k": jnp.ones((2, 2))})
          >>> Report.from_dicts(r.as_dicts()) == r
          True
        """
        return cls(tuple(Row(**{**d, "shape": tuple(d["shape"])}) for d in rows))

    def to_markdown(self) -> str:
        return self.table().to_markdown()


def summary(tree: Any, *, recipe: Any = None, plan: Any = None) -> Report:
    """Builds the per-leaf report of a parameter tree (dense arrays and compressed leaves).

    Args:
      tree: the parameters, compressed or not.
      recipe: a :class:`jaxopt_big.Recipe`; its plan for each leaf becomes a "planned" column beside
        what the leaf achieves (kind, nonzero, bits).
      plan: deprecated name of ``recipe`` (kept for one release).

    Examples:
      >>> import jax.numpy as jnp
      >>> r = summary({"Dense_0": {"kernel": jnp.zeros((4, 2)), "bias": jnp.ones(2)}})
      >>> r.totals["params"], r.totals["nbytes"], r.totals["nonzero"]
      (10, 40, 0.2)
    """
    if plan is not None:
        if recipe is not None:
            raise TypeError("summary: pass recipe=... only (plan= is its deprecated name), got both")
        warnings.warn("jb.report.summary(plan=...) is deprecated and will be removed in the next release; "
                      "use jb.report.summary(recipe=...)", DeprecationWarning, stacklevel=2)
        recipe = plan
    leaves = jax.tree.leaves(tree, is_leaf=_leaves.is_compressed)
    plans = ([None] * len(leaves) if recipe is None
             else [p and p.describe() for p in jax.tree.leaves(recipe.plans(tree), is_leaf=lambda v: v is None)])
    return Report(tuple(_row(p, x, d) for p, x, d in zip(_tree.paths(tree), leaves, plans)))


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device of training state, on the most loaded device.

    ``grads`` is the size of one gradient tree (the parameters' shardings); ``total`` adds them up
    (activations and temporaries are not included: they depend on the model and batch).
    """

    params: int
    grads: int
    opt_state: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.opt_state

    def __str__(self) -> str:
        mib = lambda b: f"{b / 2**20:.2f} MiB"
        return (f"per device: params {mib(self.params)}, grads {mib(self.grads)}, "
                f"optimizer {mib(self.opt_state)}, total {mib(self.total)}")


def _per_device_bytes(tree: Any, shardings: Any) -> int:
    loads: dict[Any, int] = {}
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings, is_leaf=lambda v: v is None)):
        shape, itemsize = tuple(np.shape(x)), _dtype(x.dtype).itemsize
        if s is None:  # unplaced: the default device holds it
            loads[None] = loads.get(None, 0) + math.prod(shape) * itemsize
            continue
        shard = math.prod(s.shard_shape(shape)) * itemsize
        for d in s.device_set:
            loads[d] = loads.get(d, 0) + shard
    return max(loads.values(), default=0)


def _opt_shardings(opt_abstract: Any, params: Any, shardings: Any) -> Any:
    """Moments mirroring a parameter (path suffix and shape) get its sharding, the rest is replicated."""
    placements = jax.tree.leaves(shardings, is_leaf=lambda v: v is None)
    by_path = {p: (tuple(np.shape(x)), s) for p, x, s in zip(_tree.paths(params), jax.tree.leaves(params), placements)}
    placed = [s for _, s in by_path.values() if s is not None]
    replicated = placed[0] if placed else None
    if isinstance(replicated, jax.sharding.NamedSharding):
        replicated = jax.sharding.NamedSharding(replicated.mesh, jax.P())

    def pick(path: str, x: Any) -> Any:
        parts = path.split("/")
        for i in range(len(parts)):
            shape_sharding = by_path.get("/".join(parts[i:]))
            if shape_sharding is not None and shape_sharding[0] == tuple(np.shape(x)):
                return shape_sharding[1]
        return replicated
    return _tree.map_with_path(pick, opt_abstract)


def training_memory(params: Any, tx: Any) -> MemoryEstimate:
    """Estimated per-device bytes of parameters, gradients and ``tx``'s state under their shardings.

    ``params`` may be arrays (their ``.sharding`` is used) or ``jax.ShapeDtypeStruct`` with a
    ``sharding``. Optimizer-state leaves that mirror a parameter (same shape, path ending in the
    parameter's path, as Adam's moments do) are counted with that parameter's sharding, as
    ``jaxopt_big.parallel.shard_params`` places them; other state is counted replicated. Nothing
    is allocated.

    Examples:
      >>> import optax, jax.numpy as jnp
      >>> m = training_memory({"w": jnp.zeros((256, 256))}, optax.adam(1e-3))
      >>> m.params, m.grads, m.opt_state
      (262144, 262144, 524292)
    """
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)),
                            params)
    shardings = jax.tree.map(lambda x: x.sharding, abstract, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    opt_abstract = jax.eval_shape(tx.init, abstract)
    per_param = _per_device_bytes(abstract, shardings)
    return MemoryEstimate(params=per_param, grads=per_param,
                          opt_state=_per_device_bytes(opt_abstract, _opt_shardings(opt_abstract, params, shardings)))
