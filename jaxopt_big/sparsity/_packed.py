"""``PackedSparse``: a pruned array stored as a packed bit mask plus its kept values."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_big import _bits
from jaxopt_big import _deprecation
from jaxopt_big import leaves as _leaves
from jaxopt_big import tree as _tree

__all__ = ["PackedSparse", "pack_params", "pack_array", "pack", "unpack"]


@flax.struct.dataclass
class PackedSparse(_leaves.Compressed):
    """One sparse array: ``bits`` (the keep-mask, 8 per byte, row-major, packed by :mod:`jaxopt_big._bits`)
    and the kept ``values``.

    Its ``nbytes`` is ``ceil(size / 8) + nnz * itemsize``: a 90%-sparse float32 array takes about
    0.525 bytes per weight instead of 4.

    Examples:
      >>> import jax.numpy as jnp
      >>> p = pack_array(jnp.array([[0.0, 2.0], [3.0, 0.0]]))
      >>> p.dense().tolist(), p.nbytes, p.kind
      ([[0.0, 2.0], [3.0, 0.0]], 9, 'sparse 50%')
    """

    bits: jax.Array
    values: jax.Array
    dense_shape: tuple[int, ...] = flax.struct.field(pytree_node=False)

    def dense(self) -> jax.Array:
        keep = _leaves.replicated(self.mask().reshape(-1))  # a running count cannot split its axis
        pos = jnp.cumsum(keep) - 1
        # one more slot: a safe index for an all-pruned array
        vals = jnp.concatenate([_leaves.replicated(self.values), jnp.zeros(1, self.values.dtype)])
        return jnp.where(keep, vals[jnp.clip(pos, 0, self.values.shape[0])], 0).reshape(self.dense_shape)

    def mask(self) -> jax.Array:
        """The keep-mask (True = stored value)."""
        size = int(np.prod(self.dense_shape))
        return _bits.unpack(self.bits, 1, size).astype(bool).reshape(self.dense_shape)

    @property
    def nbytes(self) -> int:
        return _leaves.nbytes((self.bits, self.values))

    @property
    def dense_dtype(self) -> Any:
        return self.values.dtype

    @property
    def kind(self) -> str:
        return f"sparse {1 - self.nonzero_fraction():.0%}"

    def nonzero_fraction(self) -> float:
        return self.values.shape[0] / max(int(np.prod(self.dense_shape)), 1)


def pack_array(x: Any, mask: jax.Array | None = None) -> Any:
    """Packs one array, keeping the entries where ``mask`` is True (default: the nonzeros).

    Runs eagerly: the number of kept values sets the stored size. The packed leaf stays on the mesh
    of a sharded ``x``.

    Leaves compose: ``x`` may be a compressed leaf that stores integer codes of its dense shape in
    ``values`` (an 8-bit ``jb.quant.QArray``). Its codes are packed and everything else (the scales)
    kept, so a pruned-then-quantized kernel is one leaf whose ``nbytes`` counts the mask bits, the
    kept int8 codes and the scales, and whose ``dense()`` is the quantized pruned kernel.

    Examples:
      >>> import jax.numpy as jnp
      >>> pack_array(jnp.arange(4.0), jnp.array([True, False, True, False])).values.tolist()
      [0.0, 2.0]
    """
    if _leaves.is_compressed(x):
        codes = getattr(x, "values", None)
        if (not isinstance(codes, jax.Array) or codes.shape != x.shape
                or not jnp.issubdtype(codes.dtype, jnp.integer)):
            raise TypeError(f"pack_array packs arrays, or compressed leaves that keep integer codes of their "
                            f"dense shape in `values` (an 8-bit QArray); got a {x.kind!r} leaf")
        return x.replace(values=pack_array(codes, mask))
    x = jnp.asarray(x)
    keep = (x != 0) if mask is None else jnp.asarray(mask, bool)
    if keep.shape != x.shape:
        raise ValueError(f"mask shape {keep.shape} differs from array shape {x.shape}")
    flat, kflat = np.asarray(x).reshape(-1), np.asarray(keep).reshape(-1)
    packed = PackedSparse(bits=_bits.pack(kflat, 1), values=jnp.asarray(flat[kflat]),
                          dense_shape=tuple(x.shape))
    return _leaves.place_like(packed, x)


def pack_params(params: Any, masks: Any = None, *, where: Any = _tree.KERNELS) -> Any:
    """Replaces pruned leaves by :class:`PackedSparse`.

    Args:
      params: parameter pytree.
      masks: a mask tree from :func:`make_masks` / :func:`prune` (leaves with None stay dense); if
        None, the leaves selected by ``where`` are packed by their nonzeros.
      where: the selection used when ``masks`` is None.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxopt_big.leaves import densify
      >>> packed = pack_params({"d": {"kernel": jnp.array([[0.0, 1.0], [0.0, 0.0]]), "bias": jnp.ones(2)}})
      >>> type(packed["d"]["kernel"]).__name__, densify(packed)["d"]["kernel"].tolist()
      ('PackedSparse', [[0.0, 1.0], [0.0, 0.0]])
    """
    if masks is None:
        return _tree.map_selected(lambda p, x: _pack_leaf(p, x, None), params, where)

    def one(path, m, x):
        return x if m is None else _pack_leaf(path, x, m)

    return jax.tree_util.tree_map_with_path(lambda p, m, x: one(_tree.path_str(p), m, x), masks, params,
                                            is_leaf=lambda x: x is None)


def _pack_leaf(path: str, x: Any, mask: Any) -> PackedSparse:
    if _leaves.is_compressed(x):
        raise ValueError(f"{path}: cannot pack a compressed {type(x).__name__} ({x.kind}) as sparse; pack the "
                         f"pruned float weights before quantizing them, or densify the leaf first")
    if mask is not None and jnp.shape(mask) != jnp.shape(x):
        raise ValueError(f"{path}: mask shape {jnp.shape(mask)} differs from parameter shape {jnp.shape(x)}")
    return pack_array(x, mask)


pack = _deprecation.alias(pack_params, "jb.sparsity.pack", "jb.sparsity.pack_params")
unpack = _deprecation.alias(_leaves.densify, "jb.sparsity.unpack", "jb.leaves.densify")
