"""The compressed-leaf protocol.

A compressed leaf (``QArray``, ``LowRank``, ``PackedSparse``, ``Clustered``, ...) is a pytree node that
stands in for one dense array. Every kind declares the shape and dtype of that array
(``dense_shape``, ``dense_dtype``), knows its dense value (``.dense()``), the bytes it really occupies
(``.nbytes``) and how the report should describe it (``.describe()``). Tree code in the library treats
such an object as *one* leaf, never as the arrays inside it.

A kind may also implement the execution hook ``contract(x, contraction)``: the contraction of a
layer's input with this kernel, computed on the compressed form (``x @ u @ v`` for a factorization,
an integer matmul for integer values). :mod:`jaxopt_big.intercept` calls it, in one place, for every
Dense/DenseGeneral/Conv layer whose kernel is compressed; a kind without its own hook runs on its
dense value.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["Compressed", "Contraction", "Description", "contract", "is_compressed", "densify", "nbytes",
           "leaf_nbytes", "map", "leaves_with_path", "place_like", "runs_compressed"]

_DECLARED = ("dense_shape", "dense_dtype")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Description:
    """What the report says about one leaf.

    Attributes:
      kind: short name of the storage ("dense", "int8", "lowrank r=16", "sparse 2:4", ...).
      shape: shape of the dense array the leaf stands for.
      dtype: dtype of that dense array.
      bits: stored bits per represented weight, everything included (scales, indices, masks).
      nonzero: fraction of nonzero weights in the dense value, when the leaf knows it cheaply.
      flops: floating-point operations to multiply one input row by this kernel, when it differs
        from the dense ``2 * size`` (for example ``2 * r * (m + n)`` for a rank-r factorization).
    """

    kind: str
    shape: tuple[int, ...]
    dtype: Any
    bits: float
    nonzero: float | None = None
    flops: int | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class Contraction:
    """A layer's contraction of its input with a kernel: everything bound but the two operands.

    ``c(x, kernel)`` runs the layer's own ``dot_general`` or convolution (its dimension numbers,
    strides, padding, precision) on ``x`` and ``kernel``. The kernel's leading axes are those of the
    layer's kernel; its last axis is the output-feature axis, may have any size and is the output's
    last axis, so a factored kernel chains contractions: ``c(x, u) @ v``.

    Attributes:
      op: the operation (``lax.dot_general``, ``lax.conv_general_dilated`` or the layer's own).
      args: its positional arguments after the two operands.
      kwargs: its keyword arguments (the layer's ``preferred_element_type`` among them).
      conv: True for a convolution (kernel ``(..., in, out)``, features last in the output).
      dtype: the dtype the layer's contraction returns with a dense kernel.
      int_input: ``(ints, scale)`` when a quantizing wrapper supplies ``x`` on a symmetric integer
        grid (``x == ints * scale``, ``scale`` with ``x``'s ndim); a kind with integer values may
        contract those instead of ``x``.
    """

    op: Callable[..., jax.Array]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    conv: bool
    dtype: Any
    int_input: tuple[jax.Array, jax.Array] | None = None

    def __call__(self, x: jax.Array, kernel: jax.Array, *, preferred_element_type: Any = None) -> jax.Array:
        kwargs = dict(self.kwargs)
        if preferred_element_type is not None:
            kwargs["preferred_element_type"] = preferred_element_type
        return self.op(x, kernel, *self.args, **kwargs)

    def out_scale(self, x: jax.Array, x_scale: jax.Array | None, kernel_scale: jax.Array) -> jax.Array | None:
        """Scale of ``c(x_ints, kernel_ints)`` when both scales are constant along the contraction, else None.

        ``x_scale`` (None: 1) and ``kernel_scale`` are compact scales with their operand's ndim.
        """
        x_scale = jnp.ones((1,) * x.ndim) if x_scale is None else x_scale
        if self.conv:
            dn = lax.conv_dimension_numbers(x.shape, kernel_scale.shape, self.kwargs.get("dimension_numbers"))
            if dn.rhs_spec[0] != kernel_scale.ndim - 1 or dn.out_spec[1] != x.ndim - 1:
                return None
            if x_scale.size != 1 or any(n != 1 for n in kernel_scale.shape[:-1]):
                return None
            return x_scale.reshape(()) * kernel_scale.reshape(-1)
        (lc, rc), (lb, rb) = self.args[0] if self.args else self.kwargs["dimension_numbers"]
        if lb or rb or any(x_scale.shape[d] != 1 for d in lc) or any(kernel_scale.shape[d] != 1 for d in rc):
            return None
        x_free = [d for d in range(x.ndim) if d not in lc]
        k_free = [d for d in range(kernel_scale.ndim) if d not in rc]
        x_part = x_scale.reshape([x_scale.shape[d] for d in x_free] + [1] * len(k_free))
        return x_part * kernel_scale.reshape([1] * len(x_free) + [kernel_scale.shape[d] for d in k_free])

    def straight_through(self, x: jax.Array, kernel: Any, y: jax.Array,
                         dense: Callable[[Any], jax.Array] | None = None) -> jax.Array:
        """``y`` forward with the gradient of ``c(x, kernel)``: for a ``y`` that equals that contraction
        but is computed another way (integer arithmetic, which has no useful gradient). A compressed
        ``kernel`` comes with ``dense``, its float value, computed only when differentiated."""
        @jax.custom_vjp
        def f(a, k, y):
            return y

        def fwd(a, k, y):
            return y, (a, k)

        def bwd(res, g):
            _, vjp = jax.vjp(lambda a, k: self(a, k if dense is None else dense(k)), *res)
            return (*vjp(g.astype(y.dtype)), jnp.zeros_like(g))

        f.defvjp(fwd, bwd)
        return f(x, kernel, y)


class Compressed(abc.ABC):
    """Base class of compressed leaves: a stand-in for one dense array.

    Subclasses are ``flax.struct`` dataclasses (so they flatten, jit and checkpoint) and provide:

    * ``dense_shape`` and ``dense_dtype``: shape and dtype of the dense value, as static fields or
      as properties computed from the parts (a subclass that declares neither fails at definition);
    * ``dense()``, ``nbytes`` and ``kind``;
    * optionally ``nonzero_fraction()``, ``flops()`` and the execution hook ``contract(x, c)``.

    ``shape``, ``dtype``, ``ndim`` and ``size`` are those of the dense value.
    """

    if TYPE_CHECKING:  # read-only to type checkers: subclasses give static fields or properties
        @property
        def dense_shape(self) -> tuple[int, ...]: ...

        @property
        def dense_dtype(self) -> Any: ...

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        missing = [name for name in _DECLARED if not any(
            name in vars(c) or name in vars(c).get("__annotations__", {}) for c in cls.__mro__[:-1]
            if c is not Compressed)]
        if missing:
            raise TypeError(f"compressed leaf kind {cls.__name__} must declare {missing} "
                            "(a static field or a property) for the dense value's shape and dtype")

    @abc.abstractmethod
    def dense(self) -> jax.Array:
        """The dense array this leaf stands for."""

    @property
    @abc.abstractmethod
    def nbytes(self) -> int:
        """Bytes really stored, all parts included."""

    @property
    @abc.abstractmethod
    def kind(self) -> str:
        """Short storage name for the report."""

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.dense_shape)

    @property
    def dtype(self) -> Any:
        return np.dtype(self.dense_dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def nonzero_fraction(self) -> float | None:
        """Fraction of nonzeros of the dense value if cheaply known, else None."""
        return None

    def flops(self) -> int | None:
        """FLOPs of one input row through this kernel, if not the dense count; else None."""
        return None

    def contract(self, x: jax.Array, contraction: Contraction) -> jax.Array:
        """The execution hook: ``contraction(x, self.dense())`` computed on the compressed form.

        A kind overrides it to run a layer without building its dense kernel; this default runs on
        the dense value.
        """
        return contraction(x, self.dense())

    def describe(self) -> Description:
        return Description(kind=self.kind, shape=tuple(self.shape), dtype=self.dtype,
                           bits=8 * self.nbytes / max(self.size, 1), nonzero=self.nonzero_fraction(),
                           flops=self.flops())


def contract(kernel: Any, x: jax.Array, contraction: Contraction) -> jax.Array:
    """``contraction(x, kernel)``, through the kernel's execution hook when it is compressed.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jax import lax
      >>> c = Contraction(lax.dot_general, ((((1,), (0,)), ((), ())),), {}, conv=False, dtype=jnp.float32)
      >>> contract(jnp.eye(2), jnp.ones((1, 2)), c).tolist()
      [[1.0, 1.0]]
    """
    return kernel.contract(x, contraction) if is_compressed(kernel) else contraction(x, kernel)


def runs_compressed(kernel: Any) -> bool:
    """True when ``kernel`` has its own execution hook (a kind that overrides ``contract``, or any
    object with a ``contract`` method that is not a compressed leaf, such as a training-time operand).

    Examples:
      >>> import jax.numpy as jnp
      >>> runs_compressed(jnp.ones(2))
      False
    """
    hook = getattr(type(kernel), "contract", None)
    return callable(hook) and hook is not Compressed.contract


def is_compressed(x: Any) -> bool:
    """True for compressed leaves.

    Examples:
      >>> import jax.numpy as jnp
      >>> is_compressed(jnp.zeros(3))
      False
    """
    return isinstance(x, Compressed)


def has_compressed(tree: Any) -> bool:
    """True if any leaf of ``tree`` is a compressed leaf."""
    return any(is_compressed(x) for x in jax.tree.leaves(tree, is_leaf=is_compressed))


def map(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:  # noqa: A001 - mirrors jax.tree.map
    """``jax.tree.map`` that hands compressed leaves to ``fn`` whole.

    Examples:
      >>> import jax.numpy as jnp
      >>> map(lambda x: x.shape, {"a": jnp.zeros((2, 3))})
      {'a': (2, 3)}
    """
    return jax.tree.map(fn, tree, *rest, is_leaf=is_compressed)


def leaves_with_path(tree: Any) -> list[tuple[Any, Any]]:
    """``jax.tree_util.tree_leaves_with_path`` with compressed leaves kept whole."""
    return jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_compressed)


def densify(tree: Any) -> Any:
    """Replaces every compressed leaf by its dense value.

    Examples:
      >>> import jax.numpy as jnp
      >>> densify({"w": jnp.ones(2)})["w"].tolist()
      [1.0, 1.0]
    """
    return map(lambda x: x.dense() if is_compressed(x) else x, tree)


def _place(arr: jax.Array, sharding: jax.sharding.NamedSharding) -> jax.Array:
    spec = tuple(sharding.spec) + (None,) * (arr.ndim - len(sharding.spec))
    mesh_size = lambda names: math.prod(sharding.mesh.shape[n] for n in ((names,) if isinstance(names, str) else names))
    dims = [names if names is not None and n % mesh_size(names) == 0 and n > 1 else None
            for names, n in zip(spec, arr.shape)]
    return jax.device_put(arr, jax.sharding.NamedSharding(sharding.mesh, jax.P(*dims)))


def place_like(leaf: Any, like: Any) -> Any:
    """``leaf`` (a compressed leaf or any pytree) on the mesh of the parameter ``like`` it stands for.

    Each array keeps ``like``'s mesh axes on the dims it still spans (same position, divisible by
    the axes), and is replicated over the mesh elsewhere: scales, factors, codes and masks keep the
    sharding of their parameter. A traced ``like`` or one without a ``NamedSharding`` changes nothing.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> mesh = jax.make_mesh((8,), ("x",))
      >>> w = jax.device_put(jnp.ones((4, 16)), jax.NamedSharding(mesh, jax.P(None, "x")))
      >>> place_like({"scale": jnp.ones((1, 16)), "u": jnp.ones((4, 3))}, w)["scale"].sharding.spec == jax.P(None, "x")
      True
    """
    sharding = getattr(like, "sharding", None)
    if isinstance(like, jax.core.Tracer) or not isinstance(sharding, jax.sharding.NamedSharding):
        return leaf
    return jax.tree.map(lambda a: _place(a, sharding), leaf)


def refuse_compressed(path: str, x: Any, purpose: str) -> None:
    """Raises ``ValueError`` naming ``path`` when ``x`` is a compressed leaf: techniques that need a float
    array (``purpose``, e.g. ``"to quantize"``) leave compressed leaves out or name them."""
    if is_compressed(x):
        raise ValueError(f"{path} is a compressed {type(x).__name__} ({x.kind}), not a float array {purpose}; "
                         "leave it out of where= or densify it first")


def replicated(x: jax.Array) -> jax.Array:
    """``x`` whole on every device of its mesh if it has explicit mesh axes; else ``x`` itself.

    SVD, QR, sort and gathers refuse explicitly sharded operands. The mesh is read from ``x``'s
    type, so this works eagerly and under ``jit``, with or without ``jax.set_mesh``.
    """
    sharding = jax.typeof(x).sharding
    if all(a is None for a in sharding.spec):
        return x
    return jax.sharding.reshard(x, sharding.update(spec=jax.P()))


def place_factors(u: jax.Array, v: jax.Array, like: Any) -> tuple[jax.Array, jax.Array]:
    """Factors ``u (..., r)`` and ``v (r, n)`` of the parameter ``like``: ``u`` on its row mesh axes,
    ``v`` on its column axis, the rank axis they contract whole.

    (:func:`place_like` would shard the rank axis as ``like``'s columns in ``u`` and rows in ``v``,
    which an explicitly sharded ``u @ v`` refuses.) A traced ``like`` or one without a
    ``NamedSharding`` changes nothing.
    """
    sharding = getattr(like, "sharding", None)
    if isinstance(like, jax.core.Tracer) or not isinstance(sharding, jax.sharding.NamedSharding):
        return u, v
    spec = (*sharding.spec, *(None,) * (like.ndim - len(sharding.spec)))
    return (jax.device_put(u, sharding.update(spec=jax.P(*spec[:-1], None))),
            jax.device_put(v, sharding.update(spec=jax.P(None, spec[-1]))))


def leaf_nbytes(x: Any) -> int:
    """True bytes of one leaf (compressed or array-like, including tracers and shape-dtype structs)."""
    if is_compressed(x):
        return int(x.nbytes)
    if hasattr(x, "nbytes"):
        return int(x.nbytes)
    if hasattr(x, "shape") and hasattr(x, "dtype"):  # jax.ShapeDtypeStruct
        return math.prod(x.shape) * np.dtype(x.dtype).itemsize
    return int(np.asarray(x).nbytes)


def nbytes(tree: Any) -> int:
    """Total true bytes of a tree; compressed leaves count what they really store.

    Examples:
      >>> import jax.numpy as jnp
      >>> nbytes({"a": jnp.zeros((4, 4)), "b": jnp.zeros(2, jnp.int8)})
      66
    """
    return sum(leaf_nbytes(x) for x in jax.tree.leaves(tree, is_leaf=is_compressed))
