"""Recipes: one per-layer compression plan across techniques, read by every consumer.

A :class:`Recipe` is a list of :class:`jaxopt_big.tree.Rule` whose values are :class:`Plan` s. The
same recipe drives post-training compression of a parameter tree (:meth:`Recipe.plans` gives the
plan of each leaf), the block-wise one-shot engine (:func:`jaxopt_big.oneshot.compress`),
training-time compression, and the report (planned vs achieved). This is the only layer above the
technique packages: it imports several of them, they never import it.

Methods are part of the plan. A plain sparsity (``0.5`` or ``NM(2, 4)``) prunes by magnitude; wrap it
as ``Wanda(...)`` or ``SparseGPT(...)`` to use calibration data. A plain ``QuantSpec`` rounds to
nearest (``RTN``); ``GPTQ(spec)`` quantizes with second-order error feedback.

Examples:
  >>> import jaxopt_big as jb
  >>> from jaxopt_big.tree import Rule
  >>> recipe = jb.Recipe([
  ...     Rule(r"layer_\\d+/mlp/.*", jb.Plan(sparsity=jb.SparseGPT(jb.sparsity.NM(2, 4)),
  ...                                       quant=jb.GPTQ(jb.quant.QuantSpec(bits=4, granularity=jb.quant.Group(128))))),
  ...     Rule(r".*", jb.Plan(quant=jb.quant.QuantSpec(bits=8, granularity=jb.quant.PER_CHANNEL))),
  ... ])
  >>> recipe.rules[1].value.quantizer
  RTN(spec=QuantSpec(bits=8, ...))
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Sequence

from jaxopt_big import tree as _tree
from jaxopt_big.quant import _spec as _qspec
from jaxopt_big.sparsity import _masks

__all__ = ["Plan", "Recipe", "Magnitude", "Wanda", "SparseGPT", "RTN", "GPTQ"]

Sparsity = float | _masks.NM


def _check_sparsity(owner: str, value: Any) -> None:
    if isinstance(value, _masks.NM):
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{owner}: sparsity must be a fraction in [0, 1) or NM(n, m), got {value!r}")


def _check_damp(owner: str, damp: Any) -> None:
    if isinstance(damp, bool) or not isinstance(damp, numbers.Real) or not 0.0 < float(damp) < 1.0:
        raise ValueError(f"{owner}: damp must be a fraction in (0, 1), got {damp!r}")


@dataclasses.dataclass(frozen=True)
class Magnitude:
    """Prune the smallest weights (no calibration data needed)."""

    sparsity: Sparsity

    def __post_init__(self):
        _check_sparsity("Magnitude", self.sparsity)


@dataclasses.dataclass(frozen=True)
class Wanda:
    """Prune by |weight| x input-activation norm, per output (Sun et al., 2023)."""

    sparsity: Sparsity

    def __post_init__(self):
        _check_sparsity("Wanda", self.sparsity)


@dataclasses.dataclass(frozen=True)
class SparseGPT:
    """Prune with second-order error feedback on the input Hessian (Frantar & Alistarh, 2023)."""

    sparsity: Sparsity
    block_size: int = 128
    damp: float = 0.01

    def __post_init__(self):
        _check_sparsity("SparseGPT", self.sparsity)
        _qspec._check_int("SparseGPT.block_size", self.block_size, 1)
        _check_damp("SparseGPT", self.damp)


@dataclasses.dataclass(frozen=True)
class RTN:
    """Round each weight to its nearest grid point (the spec's calibration picks the grid)."""

    spec: _qspec.Format

    def __post_init__(self):
        if not isinstance(self.spec, _qspec.Format):
            raise TypeError(f"RTN needs a QuantSpec or another Format, got {self.spec!r}")


@dataclasses.dataclass(frozen=True)
class GPTQ:
    """Quantize column by column with second-order error feedback (Frantar et al., 2022)."""

    spec: _qspec.QuantSpec
    act_order: bool = False
    block_size: int = 128
    damp: float = 0.01

    def __post_init__(self):
        if not isinstance(self.spec, _qspec.QuantSpec):
            raise TypeError(f"GPTQ needs an integer QuantSpec, got {self.spec!r}")
        if not isinstance(self.act_order, bool):
            raise TypeError(f"GPTQ.act_order must be a bool, got {self.act_order!r}")
        _qspec._check_int("GPTQ.block_size", self.block_size, 1)
        _check_damp("GPTQ", self.damp)


Pruner = Magnitude | Wanda | SparseGPT
Quantizer = RTN | GPTQ


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """What to do with one layer's kernel: prune, then quantize the survivors (either may be None).

    Attributes:
      sparsity: a fraction, ``NM(n, m)`` (magnitude pruning), or a method: ``Magnitude``, ``Wanda``,
        ``SparseGPT``.
      quant: a ``QuantSpec`` / other ``Format`` (round to nearest), or ``RTN(spec)`` / ``GPTQ(spec)``.
    """

    sparsity: Sparsity | Pruner | None = None
    quant: _qspec.Format | Quantizer | None = None

    def __post_init__(self):
        if self.sparsity is not None and not isinstance(self.sparsity, Pruner):
            _check_sparsity("Plan", self.sparsity)
        if self.quant is not None and not isinstance(self.quant, (_qspec.Format, RTN, GPTQ)):
            raise TypeError(f"Plan.quant must be a QuantSpec, Format, RTN or GPTQ, got {self.quant!r}")

    @property
    def pruner(self) -> Pruner | None:
        """The pruning method, with plain fractions and N:M read as magnitude pruning."""
        if self.sparsity is None or isinstance(self.sparsity, Pruner):
            return self.sparsity
        return Magnitude(self.sparsity)

    @property
    def quantizer(self) -> Quantizer | None:
        """The quantization method, with a plain spec read as round-to-nearest."""
        if self.quant is None or isinstance(self.quant, Quantizer):
            return self.quant
        return RTN(self.quant)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Per-layer plans: first matching rule wins; kernels no rule claims stay as they are.

    Attributes:
      rules: ``[Rule(pattern, Plan(...)), ...]`` with the semantics of :mod:`jaxopt_big.tree`.
      where: the candidate leaves (default: kernels).
    """

    rules: Sequence[_tree.Rule]
    where: Any = _tree.KERNELS

    def __post_init__(self):
        rules = tuple(self.rules) if isinstance(self.rules, (list, tuple)) else self.rules
        if not _tree.is_rules(rules) or not all(isinstance(r.value, Plan | None) for r in rules):
            raise TypeError(f"Recipe needs a non-empty list of Rule(pattern, Plan(...)), got {self.rules!r}")
        object.__setattr__(self, "rules", rules)

    def plans(self, params: Any) -> Any:
        """The :class:`Plan` of every leaf of ``params`` (``None`` where none applies)."""
        return _tree.assign(params, list(self.rules), where=self.where, what="recipe")
