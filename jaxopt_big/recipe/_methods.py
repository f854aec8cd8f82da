"""The one-shot methods and their protocol (:class:`Method`): one class per method, read by every consumer."""

from __future__ import annotations

import collections.abc
import dataclasses
import enum
import functools
import re
from typing import Any, ClassVar, NamedTuple, Self

import jax
import jax.numpy as jnp

from jaxopt_big import _checks
from jaxopt_big import calibration as _calibration
from jaxopt_big import quant as _quant
from jaxopt_big import sparsity as _sparsity

__all__ = ["Method", "Pruner", "Quantizer", "Magnitude", "Wanda", "SparseGPT", "RTN", "GPTQ", "AWQ", "AWQScore",
           "SmoothQuant", "InputStats", "Sparsity"]

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


class InputStats(NamedTuple):
    """What the engine accumulates over the calibration inputs of the linears that read one input.

    Attributes:
      hessian: ``(d_in, d_in)`` ``X^T X``.
      absmax: ``(d_in,)`` largest ``|x|`` per input channel.
      absmean: ``(d_in,)`` mean ``|x|`` per input channel.
      output_error: given by the engine to a migration when the block can run:
        ``output_error(candidates, spec, *, block=False)`` takes ``(n, d_in)`` candidate scales ``s`` and
        a weight format and returns ``(n,)`` squared errors, over the calibration set, of the output of
        the module these linears feed (``block=True``: of the block's output) when their kernels are
        ``diag(1/s) Q(diag(s) W)`` (``Q`` the format's round to nearest) and the rest of the block is float.
    """

    hessian: jax.Array
    absmax: jax.Array
    absmean: jax.Array
    output_error: collections.abc.Callable[..., jax.Array] | None = None  # dotted: pdoc resolves it on a NamedTuple


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
    - optionally :meth:`well_posed` (a check of the Hessian the solver cannot report itself);
    - optionally :meth:`for_layer`: the method for one layer by its name (the compile cache of
      :meth:`solve` keys on the method, not on ``path``, so ``solve`` must not read ``path`` otherwise);
    - optionally ``migrates = True`` and :meth:`input_scales`: per-input-channel scales ``s`` that the
      engine folds into the model before solving (the kernels' rows times ``s``, the op producing
      their input divided by ``s``), as AWQ and SmoothQuant do.

    :meth:`data_free` and :meth:`describe` come from the base class.
    """

    name: ClassVar[str]
    needs_hessian: ClassVar[bool]
    migrates: ClassVar[bool] = False
    wraps: ClassVar[bool] = False  # takes an inner method first (``AWQ(GPTQ(...))``), not its own spec

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

    def input_scales(self, kernels: tuple[jax.Array, ...], stats: InputStats) -> jax.Array | None:
        """``(d_in,)`` positive scales to migrate between the input and ``kernels`` (the ``(d_in, d_out)``
        float32 views of the planned layers that read this input), or None: no migration. Read only
        when ``migrates``; the engine then solves on ``diag(s) W`` with the statistics of ``x / s``."""
        return None

    def for_layer(self, path: str) -> Self:
        """The method as it runs on the layer named ``path`` (the engine asks before solving each
        layer; the default: unchanged). AWQ does not clip q/k projections, for instance."""
        return self

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
        activations = getattr(spec, "activations", None)
        if activations is not None:  # W8A8: inputs quantized at run time
            grid += f" a{activations.bits}"
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


class _Migrating(Quantizer):
    """A quantizer that first migrates per-input-channel scales, then quantizes with an inner quantizer
    (``quant``: a :class:`Quantizer`, or a spec read as :class:`RTN`) on the scaled weights."""

    quant: Any  # the inner Quantizer, once __post_init__ has read a spec as RTN
    wraps: ClassVar[bool] = True
    needs_hessian: ClassVar[bool] = True
    migrates: ClassVar[bool] = True

    def __post_init__(self):
        inner = RTN(self.quant) if isinstance(self.quant, _quant.Format) else self.quant
        owner = type(self).__name__
        if not isinstance(inner, Quantizer):
            raise TypeError(f"{owner} needs a Quantizer (RTN, GPTQ) or a QuantSpec, got {self.quant!r}")
        if inner.migrates:
            raise TypeError(f"{owner} wraps a quantizer that does not migrate scales itself, got {inner.describe()}")
        _checks.store(self, quant=inner, spec=inner.spec)
        _checks.store(self, **self._checked_options())

    def _checked_options(self) -> dict[str, Any]:
        """The method's own options, checked (stored by ``__post_init__``, after the inner quantizer)."""
        return {}

    def solve(self, w, hessian, *, pruned=None, path="kernel"):
        return self.quant.solve(w, hessian, pruned=pruned, path=path)

    def well_posed(self, hessian: jax.Array) -> jax.Array:
        return self.quant.well_posed(hessian)

    def data_free(self) -> RTN:
        return self.quant.data_free()

    def describe(self) -> str:
        return f"{self._label()} + {self.quant.describe()}"

    def _label(self) -> str:
        return self.name


class AWQScore(enum.Enum):
    """What :class:`AWQ` compares candidate scales on (recipe files spell the value).

    ``MODULE``: the output of the module the scaled linears feed, as the reference does (the attention
    output for q/k/v, the MLP output for gate/up, the linear's own output for o_proj and down_proj);
    ``BLOCK``: the block's output; ``LAYER``: the linears' own outputs, from the input Hessian alone
    (no block run). The first two need :func:`jaxopt_big.oneshot.compress`; elsewhere ``LAYER`` is used.
    """

    MODULE = "module"
    BLOCK = "block"
    LAYER = "layer"


@dataclasses.dataclass(frozen=True)
class AWQ(_Migrating):
    """Activation-aware scales and clipping (Lin et al., 2024), then the inner quantizer on the result.

    Per group of linears reading one input, the scales ``s = a^α`` (``a`` the mean ``|x|`` per input
    channel, ``α`` searched on ``grid`` points; see :func:`jaxopt_big.quant.awq_scales`) multiply the
    kernels' rows and divide the op producing the input (an RMSNorm/LayerNorm or the linear before),
    where :func:`jaxopt_big.oneshot.compress` finds one; without one the layers get no scales (the
    report says ``(no fold)``). ``α`` has the least error, with the group's kernels rounded to nearest
    at that scale and the rest of the block float, of the output ``score`` names: by default, as the
    reference, the output of the module the group feeds, which the engine reads at the last linear
    the block calls under the group's common parent module (Llama: q/k/v -> ``self_attn``'s
    ``o_proj``, gate/up -> ``mlp``'s ``down_proj``; a lone linear: its own output; the block's output
    when that last linear is in the group). That costs one block run per candidate and group (the
    candidates vmapped in chunks); ``AWQScore.LAYER`` needs none (the input Hessian alone). Then, per layer, the
    range of each quantization group of each output channel is clipped to the ratio of its largest
    ``|w|`` with the least output error (:func:`jaxopt_big.quant.awq_clip`), except on the layers
    ``no_clip`` names: as in the reference, the query and key projections, whose errors the attention
    scores' softmax amplifies in a way a per-layer error does not see.

    Attributes:
      quant: the inner quantizer (``RTN``, ``GPTQ``) or a spec (round to nearest).
      grid: candidate exponents ``α = i / grid``, ``i = 0..grid-1``; the clipping ratios' step ``1 / grid``.
      score: an :class:`AWQScore` (or its value): the output the scales are chosen on. Default: the
        module the linears feed, as the reference (AutoAWQ's ``module2inspect``, llm-awq's ``auto_scale``).
      duo: ``s = a^α / (w^(1-α) + 1e-4)`` with ``w`` the kernels' mean ``|W|`` normalized per
        quantization group (AutoAWQ's ``duo_scaling``, its default); False: llm-awq's and the paper's
        ``a^α``. On the trained decoder of ``benchmarks/methods.py`` duo has the lower validation
        perplexity (5.1206 vs 5.1241 at int4 g128).
      clip: search the clipping ratios. None (default): before round to nearest, not before GPTQ,
        whose error feedback reproduces the kernel it is given, so clipped weights would become its
        target and the clipping error would go uncompensated (GPTQ picks each group's range itself).
      max_shrink: in (0, 1]: clipping ratios stay above ``1 - max_shrink``.
      no_clip: regex on the layer's path (``re.search``) of the layers never clipped.

    Examples:
      >>> import jaxopt_big as jb
      >>> int4 = jb.quant.QuantSpec(bits=4, granularity=jb.quant.Group(128))
      >>> jb.AWQ(jb.GPTQ(int4)).describe(), jb.AWQ(int4).describe(), jb.AWQ(int4).data_free()
      ('awq + gptq int4 g128', 'awq clip + rtn int4 g128', RTN(spec=QuantSpec(bits=4, ...)))
      >>> jb.AWQ(int4).for_layer("layers/0/self_attn/k_proj").clip, jb.AWQ(int4).for_layer("layers/0/mlp/up_proj").clip
      (False, True)
    """

    quant: Quantizer | _quant.Format
    grid: int = 20
    score: AWQScore | str = AWQScore.MODULE
    duo: bool = True
    clip: bool | None = None
    max_shrink: float = 0.5
    no_clip: str = r"(^|/)(q_proj|k_proj|query|key)$"
    spec: _quant.Format = dataclasses.field(init=False, repr=False)
    name: ClassVar[str] = "awq"

    def _checked_options(self) -> dict[str, Any]:
        inner: Quantizer = self.quant  # type: ignore[assignment]  # __post_init__ stored the Quantizer
        clip = not inner.needs_hessian if self.clip is None else _checks.flag("AWQ.clip (or None)", self.clip)
        if not isinstance(self.no_clip, str):
            raise TypeError(f"AWQ.no_clip must be a regex string, got {self.no_clip!r}")
        try:
            re.compile(self.no_clip)
        except re.error as e:
            raise ValueError(f"AWQ.no_clip is not a valid regex: {self.no_clip!r} ({e})") from None
        try:
            score = AWQScore(self.score)
        except ValueError:
            raise ValueError(f"AWQ.score must be one of {', '.join(s.value for s in AWQScore)}, "
                             f"got {self.score!r}") from None
        return {"grid": _checks.integer("AWQ.grid", self.grid, low=1), "clip": clip, "score": score,
                "duo": _checks.flag("AWQ.duo", self.duo),
                "max_shrink": _checks.fraction("AWQ.max_shrink", self.max_shrink, open_low=True, closed=True)}

    def input_scales(self, kernels, stats):
        measure = None
        if self.score is not AWQScore.LAYER and stats.output_error is not None:
            measure = functools.partial(stats.output_error, spec=self.spec, block=self.score is AWQScore.BLOCK)
        return _quant.awq_scales(kernels, stats.hessian, self.spec, act_scale=stats.absmean, grid=self.grid,
                                 duo=self.duo, measure=measure).scales

    def for_layer(self, path: str) -> Self:
        return dataclasses.replace(self, clip=False) if self.clip and re.search(self.no_clip, path) else self

    def solve(self, w, hessian, *, pruned=None, path="kernel"):
        if self.clip:
            w = _quant.awq_clip(w, hessian, self.spec, grid=self.grid, max_shrink=self.max_shrink, path=path).kernel
        return self.quant.solve(w, hessian, pruned=pruned, path=path)

    def _label(self) -> str:
        return f"{self.name} clip" if self.clip else self.name


@dataclasses.dataclass(frozen=True)
class SmoothQuant(_Migrating):
    """SmoothQuant (Xiao et al., 2023): move activation outliers into the weights, then the inner quantizer.

    Per group of linears reading one input, ``s = max|x|^α / max|W|^(1-α)`` per input channel (see
    :func:`jaxopt_big.quant.smoothquant_scales`) multiplies the kernels' rows and divides the op
    producing the input, found and folded as for :class:`AWQ`. For W8A8: int8 weights (e.g. per
    output channel) here, activations quantized per token at run time by the W8A8 path.

    Attributes:
      quant: the inner quantizer or a spec (round to nearest).
      alpha: migration strength in [0, 1].

    Examples:
      >>> import jaxopt_big as jb
      >>> jb.SmoothQuant(jb.quant.QuantSpec(bits=8, granularity=jb.quant.PER_CHANNEL)).describe()
      'smoothquant 0.5 + rtn int8'
    """

    quant: Quantizer | _quant.Format
    alpha: float = 0.5
    spec: _quant.Format = dataclasses.field(init=False, repr=False)
    name: ClassVar[str] = "smoothquant"

    def _checked_options(self) -> dict[str, Any]:
        return {"alpha": _checks.number("SmoothQuant.alpha", self.alpha, low=0, high=1)}

    def input_scales(self, kernels, stats):
        return _quant.smoothquant_scales(stats.absmax, kernels, alpha=self.alpha)

    def _label(self) -> str:
        return f"{self.name} {self.alpha:g}"
