"""The matrix view of a linear layer: kernel ``(d_in, d_out)`` and input rows ``(n, d_in)``.

Dense/Linear kernels are already ``(d_in, d_out)``. DenseGeneral/LinearGeneral contract several
input axes (``axis``) against the leading kernel axes; Einsum contracts the kernel axes its equation
shares with the input and not with the output. Every one-shot solver works on the 2-d view; results
go back to the kernel's own layout (and onto a stacked kernel's layer) with :meth:`View.unview`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["View", "view_of", "TARGETS"]

TARGETS = (nn.Dense, nn.DenseGeneral, nn.Einsum, nnx.Linear, nnx.LinearGeneral, nnx.Einsum)


@dataclasses.dataclass(frozen=True)
class View:
    """How one layer's kernel and inputs map to the 2-d view.

    Attributes:
      kernel_shape: the (unstacked) kernel shape.
      contracted: kernel axes contracted with the input, in the order they are flattened.
      input_axes: the matching input axes (negative ones count from the end), same order.
    """

    kernel_shape: tuple[int, ...]
    contracted: tuple[int, ...]
    input_axes: tuple[int, ...]

    @property
    def kept(self) -> tuple[int, ...]:
        return tuple(a for a in range(len(self.kernel_shape)) if a not in self.contracted)

    @property
    def perm(self) -> tuple[int, ...]:
        return self.contracted + self.kept

    @property
    def is_identity(self) -> bool:
        """The view is the kernel itself: a 2-d kernel ``(d_in, d_out)``."""
        return self.perm == (0, 1)

    @property
    def d_in(self) -> int:
        return math.prod(self.kernel_shape[a] for a in self.contracted)

    @property
    def d_out(self) -> int:
        return math.prod(self.kernel_shape[a] for a in self.kept)

    def matrix(self, kernel: jax.Array) -> jax.Array:
        """The ``(d_in, d_out)`` float32 view of a kernel."""
        return jnp.transpose(jnp.asarray(kernel, jnp.float32), self.perm).reshape(self.d_in, self.d_out)

    def unview(self, matrix: jax.Array) -> jax.Array:
        """A ``(d_in, d_out)`` matrix back in the kernel's layout (inverse of :meth:`matrix`)."""
        shape = tuple(self.kernel_shape[a] for a in self.perm)
        return jnp.transpose(matrix.reshape(shape), _inverse(self.perm))

    def rows(self, inputs: jax.Array, row_mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """Input rows ``(n, d_in)`` float32 and their weights ``(n,)`` (the row mask, or ones)."""
        ndim = inputs.ndim
        axes = tuple(a % ndim for a in self.input_axes)
        lead = tuple(a for a in range(ndim) if a not in axes)
        x = jnp.transpose(inputs, lead + axes).astype(jnp.float32)
        lead_shape = x.shape[:len(lead)]
        x = x.reshape(-1, self.d_in)
        if row_mask is None:
            return x, jnp.ones(x.shape[0], jnp.float32)
        mask = jnp.asarray(row_mask, jnp.float32)
        mask = mask.reshape(mask.shape + (1,) * (len(lead_shape) - mask.ndim))
        return x, jnp.broadcast_to(mask, lead_shape).reshape(-1)

    def scale_layout(self, scale: jax.Array, path: str) -> jax.Array:
        """A ``(groups, d_out)`` scale (or zero point) of the 2-d view in the kernel's layout."""
        groups = scale.shape[0]
        in_dims = [self.kernel_shape[a] for a in self.contracted]
        size = self.d_in // groups  # inputs per scale row, flattened row-major over the contracted axes
        scale_in = []
        for n in reversed(in_dims):
            if size >= n:
                if size % n:
                    raise ValueError(f"{path}: group size {self.d_in // groups} does not align with the "
                                     f"kernel's input axes {tuple(in_dims)}")
                scale_in.append(1)
                size //= n
            else:
                if n % size:
                    raise ValueError(f"{path}: group size {self.d_in // groups} does not align with the "
                                     f"kernel's input axes {tuple(in_dims)}")
                scale_in.append(n // size)
                size = 1
        out_dims = [self.kernel_shape[a] for a in self.kept] if scale.shape[1] > 1 else [1] * len(self.kept)
        shaped = scale.reshape(tuple(reversed(scale_in)) + tuple(out_dims))
        return jnp.transpose(shaped, _inverse(self.perm))


def _inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


def _einsum_view(equation: str, kernel_shape: tuple[int, ...], path: str) -> View:
    equation = equation.replace(" ", "")
    lhs, out = equation.split("->")
    inp, rhs = lhs.split(",")
    head, _, tail = inp.partition("...")
    if "..." not in inp:
        head, tail = "", inp
    for letter in rhs:
        in_input, in_output = letter in inp, letter in out
        if in_input and in_output:
            raise ValueError(f"{path}: Einsum {equation!r} has a batch axis {letter!r} shared by input, kernel and "
                             "output; one-shot compression needs kernel axes that are contracted or output-only")
        if not in_input and not in_output:
            raise ValueError(f"{path}: Einsum {equation!r} sums kernel axis {letter!r} away")
    contracted = tuple(i for i, letter in enumerate(rhs) if letter in inp)
    if not contracted:
        raise ValueError(f"{path}: Einsum {equation!r} contracts no kernel axis with its input")

    def input_axis(letter: str) -> int:
        if letter in tail:
            return tail.index(letter) - len(tail)
        return head.index(letter)
    return View(kernel_shape, contracted, tuple(input_axis(rhs[i]) for i in contracted))


def _axes(axis: Any) -> tuple[int, ...]:
    return tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)


def view_of(module: Any, kernel_shape: tuple[int, ...], path: str) -> View:
    """The :class:`View` of a targeted layer (``kernel_shape``: its unstacked kernel).

    Raises:
      ValueError: a layout one-shot compression cannot flatten (batch dims, batch Einsum axes).
    """
    kernel_shape = tuple(kernel_shape)
    if isinstance(module, (nn.Dense, nnx.Linear)):
        return View(kernel_shape, (0,), (-1,))
    if isinstance(module, nn.DenseGeneral):
        if _axes(module.batch_dims):
            raise ValueError(f"{path}: DenseGeneral with batch_dims={module.batch_dims} is not supported")
        return View(kernel_shape, tuple(range(len(_axes(module.axis)))), _axes(module.axis))
    if isinstance(module, nnx.LinearGeneral):
        if getattr(module, "batch_axis", None):
            raise ValueError(f"{path}: LinearGeneral with batch_axis={module.batch_axis} is not supported")
        return View(kernel_shape, tuple(range(len(_axes(module.axis)))), _axes(module.axis))
    if isinstance(module, (nn.Einsum, nnx.Einsum)):
        if module.einsum_str is None:  # given at call time only: the kernel layout is unknown here
            raise ValueError(f"{path}: an Einsum whose equation is passed at call time is not supported")
        return _einsum_view(module.einsum_str, kernel_shape, path)
    raise TypeError(f"{path}: {type(module).__name__} is not a layer one-shot compression targets")

