"""The one-shot methods and their protocol (:class:`Method`): one class per method, read by every consumer."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxopt_big import _checks
from jaxopt_big import calibration as _calibration
from jaxopt_big import quant as _quant
from jaxopt_big import sparsity as _sparsity

__all__ = ["Method", "Pruner", "Quantizer", "Magnitude", "Wanda", "SparseGPT", "RTN", "GPTQ", "Sparsity"]

Sparsity = float | _sparsity.NM


def _check_sparsity(owner: str, value: Any) -> Any:
    if isinstance(value, _sparsity.NM):
        return value
    return _checks.fraction(f"{owner}.sparsity (a fraction or NM(n, m))", value)


def _check_damp(owner: str, damp: Any) -> float:
    return _checks.fraction(f"{owner}.damp", damp, open_low=True)


def _hessian_inverts(hessian: jax.Array, damp: float) -> jax.Array:
    """Whether the damped inverse a second-order solver uses is finite (XLA computes it once)."""
    return jnp.all(jnp.isfinite(_calibration.inverse_hessian(hessian, damp=damp)[0]))


class Method:
    """A one-shot compression method: the protocol every consumer of a recipe reads.

    The engine (:func:`jaxopt_big.oneshot.compress`), :meth:`Recipe.apply`, :meth:`Recipe.for_training`,
    the recipe-file loader and the reports call only this protocol, never test the method's class.
    A new method is one frozen dataclass deriving from :class:`Pruner` or :class:`Quantizer` in this
    module that defines:

    - ``name``: its name in reports and in recipe files (``prune = "..."`` / ``method = "..."``);
    - ``needs_hessian``: whether :meth:`solve` reads the input Hessian ``X^T X`` (calibration data);
      :meth:`Recipe.apply` refuses such a method and :meth:`Recipe.for_training` trains its
      :meth:`data_free` counterpart instead;
    - :meth:`solve`: the per-layer solver, pure and jittable on the ``(d_in, d_out)`` float32 view;
    - optionally :meth:`well_posed` (a check of the Hessian the solver cannot report itself).

    :meth:`data_free` and :meth:`describe` come from the base class.
    """

    name: ClassVar[str]
    needs_hessian: ClassVar[bool]

    def solve(self, w: jax.Array, hessian: jax.Array, *, pruned: jax.Array | None = None,
              path: str = "kernel") -> Any:
        """The compressed ``(d_in, d_out)`` view ``w``: a float32 array, or a ``QArray`` when the
        method chose an integer grid. ``hessian``: ``(d_in, d_in)`` ``X^T X`` of the layer's inputs;
        ``pruned``: weights an earlier step of the plan pruned (they must stay zero); ``path`` names
        the layer in errors."""
        raise NotImplementedError

    def well_posed(self, hessian: jax.Array) -> jax.Array:
        """A traced bool: False when ``hessian`` did not suit the solver (the engine then raises)."""
        return jnp.asarray(True)

    def data_free(self) -> Method:
        """The method used without calibration data: :class:`Magnitude` or :class:`RTN`."""
        raise NotImplementedError

    def describe(self) -> str:
        """A short label, e.g. ``sparsegpt 2:4`` or ``gptq int4 g128``."""
        raise NotImplementedError

    @classmethod
    def named(cls) -> dict[str, type[Method]]:
        """The methods deriving from this class, by :attr:`name` (as recipe files spell them)."""
        out: dict[str, type[Method]] = {}
        for sub in cls.__subclasses__():
            if "name" in vars(sub):
                out[sub.name] = sub
            out.update(sub.named())
        return out


class Pruner(Method):
    """A method that prunes a kernel to ``sparsity`` (a fraction or ``NM(n, m)``)."""

    sparsity: Sparsity

    def data_free(self) -> Magnitude:
        return Magnitude(self.sparsity)

    def describe(self) -> str:
        s = self.sparsity
        return f"{self.name} {f'{s.n}:{s.m}' if isinstance(s, _sparsity.NM) else f'{float(s):.0%}'}"

    def _fraction_structure(self) -> tuple[float, Any]:
        """``(fraction, structure)`` as the per-layer solvers take them."""
        return (0.0, self.sparsity) if isinstance(self.sparsity, _sparsity.NM) else (float(self.sparsity), None)


class Quantizer(Method):
    """A method that puts a kernel on the grid of ``spec``, which also stores the result."""

    spec: _quant.Format

    def data_free(self) -> RTN:
        return RTN(self.spec)

    def describe(self) -> str:
        spec = self.spec
        grid = f"int{spec.bits}" if isinstance(spec, _quant.QuantSpec) else type(spec).__name__.lower()
        granularity = getattr(spec, "granularity", None)
        if isinstance(granularity, _quant.Group):
            grid += f" g{granularity.size}"
        return f"{self.name} {grid}"


@dataclasses.dataclass(frozen=True)
class Magnitude(Pruner):
    """Prune the smallest weights (no calibration data needed)."""

    sparsity: Sparsity
    name: ClassVar[str] = "magnitude"
    needs_hessian: ClassVar[bool] = False

    def __post_init__(self):
        _checks.store(self, sparsity=_check_sparsity("Magnitude", self.sparsity))

    def keep(self, w: jax.Array, path: str = "kernel") -> jax.Array:
        """The bool mask of the weights kept (per layer; N:M along the input axis)."""
        scores = _sparsity.magnitude({path: w})
        if isinstance(self.sparsity, _sparsity.NM):
            return _sparsity.make_masks(scores, None, where=".*", structure=self.sparsity)[path]
        return _sparsity.make_masks(scores, float(self.sparsity), where=".*")[path]

    def solve(self, w, hessian=None, *, pruned=None, path="kernel"):
        return jnp.where(self.keep(w, path), w, 0.0)

    def data_free(self) -> Magnitude:
        return self


@dataclasses.dataclass(frozen=True)
class Wanda(Pruner):
    """Prune by |weight| x input-activation norm, per output (Sun et al., 2023)."""

    sparsity: Sparsity
    name: ClassVar[str] = "wanda"
    needs_hessian: ClassVar[bool] = True

    def __post_init__(self):
        _checks.store(self, sparsity=_check_sparsity("Wanda", self.sparsity))

    def solve(self, w, hessian, *, pruned=None, path="kernel"):
        norms = jnp.sqrt(jnp.maximum(jnp.diagonal(hessian), 0.0))
        fraction, structure = self._fraction_structure()
        return _sparsity.wanda_kernel(w, norms, fraction, structure=structure, path=path)


@dataclasses.dataclass(frozen=True)
class SparseGPT(Pruner):
    """Prune with second-order error feedback on the input Hessian (Frantar & Alistarh, 2023)."""

    sparsity: Sparsity
    block_size: int = 128
    damp: float = 0.01
    name: ClassVar[str] = "sparsegpt"
    needs_hessian: ClassVar[bool] = True

    def __post_init__(self):
        _checks.store(self, sparsity=_check_sparsity("SparseGPT", self.sparsity),
                      block_size=_checks.integer("SparseGPT.block_size", self.block_size, low=1),
                      damp=_check_damp("SparseGPT", self.damp))

    def solve(self, w, hessian, *, pruned=None, path="kernel"):
        fraction, structure = self._fraction_structure()
        return _sparsity.sparsegpt_kernel(w, hessian, fraction, structure=structure, block_size=self.block_size,
                                          damp=self.damp, path=path)

    def well_posed(self, hessian: jax.Array) -> jax.Array:
        return _hessian_inverts(hessian, self.damp)


@dataclasses.dataclass(frozen=True)
class RTN(Quantizer):
    """Round each weight to its nearest grid point (the spec's calibration picks the grid)."""

    spec: _quant.Format
    name: ClassVar[str] = "rtn"
    needs_hessian: ClassVar[bool] = False

    def __post_init__(self):
        if not isinstance(self.spec, _quant.Format):
            raise TypeError(f"RTN needs a QuantSpec or another Format, got {self.spec!r}")

    def solve(self, w, hessian=None, *, pruned=None, path="kernel"):
        # an integer grid returns its QArray (scales per view row group); another format its rounded
        # values, stored in the format's own layout once the kernel is reassembled
        if isinstance(self.spec, _quant.QuantSpec):
            return self.spec.quantize(w, path=path)
        return self.spec.fake_quant(w)

    def data_free(self) -> RTN:
        return self


@dataclasses.dataclass(frozen=True)
class GPTQ(Quantizer):
    """Quantize column by column with second-order error feedback (Frantar et al., 2022)."""

    spec: _quant.QuantSpec
    act_order: bool = False
    block_size: int = 128
    damp: float = 0.01
    name: ClassVar[str] = "gptq"
    needs_hessian: ClassVar[bool] = True

    def __post_init__(self):
        if not isinstance(self.spec, _quant.QuantSpec):
            raise TypeError(f"GPTQ needs an integer QuantSpec, got {self.spec!r}")
        _checks.store(self, act_order=_checks.flag("GPTQ.act_order", self.act_order),
                      block_size=_checks.integer("GPTQ.block_size", self.block_size, low=1),
                      damp=_check_damp("GPTQ", self.damp))

    def solve(self, w, hessian, *, pruned=None, path="kernel"):
        return _quant.gptq_kernel(w, hessian, self.spec, block_size=self.block_size, damp=self.damp,
                                  act_order=self.act_order, pruned=pruned, path=path)

    def well_posed(self, hessian: jax.Array) -> jax.Array:
        return _hessian_inverts(hessian, self.damp)
