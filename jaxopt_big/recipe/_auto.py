"""Automatic mixed precision: bits per layer under an average-bits budget, from estimated loss increases.

:class:`Auto` says what to choose among (one quantizer at several bit widths) and the budget;
:class:`Sensitivity` holds what was measured per kernel (the cost, an estimate of the loss increase, and
the stored bytes of each choice, per fold of the calibration batches) and, when the model measured it, a
way to measure a mix on held-out batches; :func:`auto` checks on those held-out batches which widths to
choose among (:meth:`Sensitivity.check`), picks the bits per kernel with the exact knapsack
(:func:`jaxopt_big.quant.allocate_bits`) and returns an ordinary :class:`Recipe`, one exact rule per
kernel. The measurement runs the one-shot engine, which lives above this package: use
:func:`jaxopt_big.oneshot.auto` (measure, then allocate) on a model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from jaxopt_big import _checks
from jaxopt_big import quant as _quant
from jaxopt_big import tree as _tree
from jaxopt_big.recipe._methods import GPTQ, Quantizer
from jaxopt_big.recipe._plan import Plan, Recipe
from jaxopt_big.recipe._presets import _HEAD
from jaxopt_big.recipe._toml import _CALIBRATIONS, _GRANULARITIES, _options, _rule_of

__all__ = ["Auto", "Check", "Sensitivity", "auto", "to_toml"]

# held_out(fold, {path: bits}): the loss increase of that mix on the fold's calibration batches
HeldOut = Callable[[int, Mapping[str, int]], float]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Auto:
    """Options of automatic mixed precision: an average-bits budget and the choices per layer.

    Attributes:
      bits: average bits per weight over the compressed layers, scales (and zero points) included,
        as llama.cpp counts "bits per weight": int4 in groups of 128 with float32 scales is 4.25.
        A Python, NumPy or JAX scalar.
      choices: the bit widths a layer may get. Default ``(2, 3, 4, 5, 6, 8)``: every width at which the
        codes pack densely from 2 up to 6 bits, each a distinct step of error and bytes, and 8 (int8,
        which the W8A8 and decode paths run natively) for the layers that need more than 6; 7 is left
        out (one engine run fewer per fold; a layer needing more than 6 bits gets 8). The lowest
        widths are where the costs are least reliable (the second-order estimate is taken far from
        where it holds, and GPTQ's error compensation fits the calibration data most): whether they are
        used is decided on held-out calibration batches (``folds``), not assumed.
      quantizer: the method and grid of every choice; its spec's ``bits`` is replaced by each choice.
        Default: GPTQ, symmetric, groups of 128, MSE grid (the ``gptq-int4`` preset's).
      folds: the calibration batches are split into this many folds (batch ``i`` in fold ``i % folds``)
        and each fold's costs are measured with the kernels the engine fits on the other folds, so that
        no cost is measured on the data its kernel was fitted to (GPTQ at 2 bits fits its calibration
        data far better than new data). Then :meth:`Sensitivity.check` tries, for each lowest width and
        fold, the allocation chosen on the other folds against uniform bits on the held-out fold, and the
        recipe is the one that beat uniform by the most there, or uniform when none did: never worse than
        the widest uniform width within the budget on held-out calibration data. The engine runs ``folds``
        times per width, on ``(folds - 1) / folds`` of the batches each. 1: one run per width on all
        batches, costs in-sample, no check (as with fewer batches than folds).

    Examples:
      >>> Auto(bits=4.25).plan(3).describe()
      'gptq int3 g128'
      >>> Auto(bits=4.25, choices=(4, 9))
      Traceback (most recent call last):
      ...
      ValueError: Auto.choices: QuantSpec.bits must be an int in [2, 8], got 9
      >>> Auto(bits=4.25, folds=0)
      Traceback (most recent call last):
      ...
      ValueError: Auto.folds must be an int >= 1, got 0
    """

    bits: float
    choices: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
    quantizer: Quantizer = GPTQ(_quant.QuantSpec(bits=4, granularity=_quant.Group(128), calibration=_quant.MSE()))
    folds: int = 2

    def __post_init__(self):
        bits = _checks.number("Auto.bits", self.bits, above=0)
        if not isinstance(self.quantizer, Quantizer) or not isinstance(self.quantizer.spec, _quant.QuantSpec):
            raise TypeError(f"Auto.quantizer must be a quantizer with an integer QuantSpec (RTN or GPTQ), "
                            f"got {self.quantizer!r}")
        if not isinstance(self.choices, (tuple, list)) or not self.choices:
            raise ValueError(f"Auto.choices must be a non-empty tuple of bit widths, got {self.choices!r}")
        choices = tuple(sorted({_checks.integer("Auto.choices", b) for b in self.choices}))
        if len(choices) != len(self.choices):
            raise ValueError(f"Auto.choices has a repeated bit width: {tuple(self.choices)!r}")
        for b in choices:  # each width must make a valid spec (the message is QuantSpec's)
            try:
                self.plan(b)
            except ValueError as e:
                raise ValueError(f"Auto.choices: {e}") from None
        _checks.store(self, bits=float(bits), choices=choices, folds=_checks.integer("Auto.folds", self.folds, low=1))

    @property
    def spec(self) -> _quant.QuantSpec:
        """The quantizer's grid (its ``bits`` is replaced by each choice)."""
        assert isinstance(self.quantizer.spec, _quant.QuantSpec)  # checked at construction
        return self.quantizer.spec

    def plan(self, bits: int) -> Plan:
        """The plan of a layer given ``bits``: the quantizer at that width."""
        spec = dataclasses.replace(self.spec, bits=bits)
        return Plan(quant=dataclasses.replace(self.quantizer, spec=spec))  # type: ignore[type-var]

    def uniform(self, bits: int) -> Recipe:
        """Every layer at ``bits`` (head and embeddings dense, as in the presets)."""
        return Recipe([_HEAD, _tree.Rule(".*", self.plan(bits))])


@dataclasses.dataclass(frozen=True)
class Sensitivity:
    """What each bit-width choice costs, per kernel (by its leaf path, as recipe rules match it).

    Attributes:
      errors: ``{path: {bits: cost}}``: what compressing the kernel at that width costs, taken to add up
        across layers; :func:`jaxopt_big.oneshot.auto` estimates the loss increase to second order,
        ``sum(g * dy + (g * dy)**2 / 2)`` with ``g = dL/dy`` on the layer's output ``y`` and ``dy = x W' - x W``,
        over the calibration tokens and output features and the kernel's layers (every layer of a stacked
        kernel), or measures it (the loss with that kernel alone quantized, minus the float loss).
      sizes: ``{path: {bits: bytes stored}}`` (codes, scales and zero points).
      weights: ``{path: number of weights}``.
      folds: the costs of each fold of the calibration batches (``errors`` is their sum), each measured
        with kernels fitted on the other folds; empty when not split.
      held_out: ``held_out(fold, {path: bits})``: the loss increase of that mix on the fold's batches, with
        the kernels fitted on the other folds (what :meth:`check` compares); None when not measured.
    """

    errors: Mapping[str, Mapping[int, float]]
    sizes: Mapping[str, Mapping[int, int]]
    weights: Mapping[str, int]
    folds: tuple[Mapping[str, Mapping[int, float]], ...] = ()
    held_out: HeldOut | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if not self.weights:
            raise ValueError("Sensitivity needs at least one layer")
        if not set(self.errors) == set(self.sizes) == set(self.weights):
            odd = sorted((set(self.errors) | set(self.sizes) | set(self.weights))
                         - (set(self.errors) & set(self.sizes) & set(self.weights)))
            raise ValueError(f"Sensitivity: errors, sizes and weights must have the same paths; not in all: {odd}")
        for path in self.weights:
            if set(self.errors[path]) != set(self.sizes[path]):
                raise ValueError(f"{path}: errors are for bits {sorted(self.errors[path])}, sizes for bits "
                                 f"{sorted(self.sizes[path])}")
            for i, fold in enumerate(self.folds):
                if set(fold.get(path, ())) != set(self.errors[path]):
                    raise ValueError(f"{path}: fold {i} has costs for bits {sorted(fold.get(path, ()))}, errors "
                                     f"for bits {sorted(self.errors[path])}")
        if self.held_out is not None and not callable(self.held_out):
            raise TypeError(f"Sensitivity.held_out must be a function held_out(fold, allocation) -> float, "
                            f"got {self.held_out!r}")
        _checks.store(self, folds=tuple(self.folds))

    def only(self, choices: tuple[int, ...]) -> Sensitivity:
        """The measurements of these bit widths only."""
        def pick(costs: Mapping[str, Mapping[int, Any]]) -> dict[str, dict[int, Any]]:
            return {p: {b: c[b] for b in choices} for p, c in costs.items()}
        return Sensitivity(pick(self.errors), pick(self.sizes), self.weights, tuple(pick(f) for f in self.folds),
                           self.held_out)

    def total_weights(self) -> int:
        """The number of weights of all layers."""
        return sum(self.weights.values())

    def nbytes(self, allocation: Mapping[str, int]) -> int:
        """Bytes of the layers at ``{path: bits}``."""
        return sum(self.sizes[p][b] for p, b in allocation.items())

    def error(self, allocation: Mapping[str, int]) -> float:
        """Summed cost of the layers at ``{path: bits}``."""
        return sum(self.errors[p][b] for p, b in allocation.items())

    def average_bits(self, allocation: Mapping[str, int]) -> float:
        """Bits per weight (scales included) of the layers at ``{path: bits}``."""
        return 8 * self.nbytes(allocation) / self.total_weights()

    def budget(self, bits: float) -> int:
        """Bytes allowed at ``bits`` average bits per weight, checked against what the choices can reach.

        Raises:
          ValueError: ``bits`` below every layer at its fewest bits or above every layer at its most.
        """
        bits = _checks.number("bits", bits, above=0)
        lowest = self.average_bits({p: min(s) for p, s in self.sizes.items()})
        highest = self.average_bits({p: max(s) for p, s in self.sizes.items()})
        if not lowest <= bits <= highest:
            raise ValueError(f"bits={bits!r} average bits per weight is outside what the choices reach on these "
                             f"{len(self.weights)} layers (scales included): [{lowest:.4g}, {highest:.4g}]")
        return math.floor(round(bits * self.total_weights() / 8, 6))  # 4.25 bpw of 2**k weights is exact

    def uniform(self, budget: int) -> int:
        """The most bits every layer can have within ``budget`` bytes."""
        widths = sorted(next(iter(self.sizes.values())))
        return max((b for b in widths if self.nbytes(dict.fromkeys(self.weights, b)) <= budget), default=widths[0])

    def allocate(self, budget: int, lowest: int | None = None, costs: Mapping[str, Mapping[int, float]] | None = None
                 ) -> dict[str, int]:
        """``{path: bits}`` of least summed cost (``costs``, default ``errors``) within ``budget`` bytes, among
        the widths ``>= lowest``; each kernel's costs taken non-negative and non-increasing in bits (a wider
        width never costs more; a tie goes to it)."""
        costs = self.errors if costs is None else costs
        keep = lambda by_bits: {b: v for b, v in by_bits.items() if lowest is None or b >= lowest}  # noqa: E731
        return _quant.allocate_bits(_monotone({p: keep(c) for p, c in costs.items()}),
                                    {p: keep(s) for p, s in self.sizes.items()}, budget)

    def check(self, bits: float) -> Check:
        """The allocation at ``bits`` that beat uniform bits on data that chose neither it nor its kernels.

        For each lowest width whose uniform bytes fit the budget, and each fold: the allocation among the
        widths ``>= lowest`` chosen on the other folds' costs, and its gain on the fold's own batches over
        every layer at the widest uniform width within the budget (:attr:`held_out`, with kernels fitted
        on the other folds). The best of them is kept if its gain is positive, else uniform. The
        single-layer costs alone cannot show what this shows: a cost that does not carry to new data, and
        layers whose errors do not add up.

        Raises:
          ValueError: no :attr:`held_out` or fewer than 2 folds.

        Examples:
          >>> errors = {"a": {2: 1.0, 8: 0.0}, "b": {2: 5.0, 8: 0.0}}  # the costs: b needs 8 bits, a does not
          >>> mix = lambda fold, bits: 3.0 if bits == {"a": 2, "b": 8} else 2.0  # held out: that mix is worse
          >>> s = Sensitivity(errors, {"a": {2: 2, 8: 8}, "b": {2: 2, 8: 8}}, {"a": 8, "b": 8}, (errors, errors), mix)
          >>> check = s.check(bits=5)
          >>> check.gains, check.lowest, check.allocation
          ({2: (-1.0, -1.0)}, None, {'a': 2, 'b': 2})
        """
        if self.held_out is None or len(self.folds) < 2:
            raise ValueError(f"Sensitivity.check needs held_out and at least 2 folds, got {len(self.folds)} folds "
                             f"and held_out={self.held_out!r}")
        budget = self.budget(bits)
        uniform = dict.fromkeys(self.weights, self.uniform(budget))
        gains: dict[int, tuple[float, ...]] = {}
        mixes: dict[tuple[int, int], dict[str, int]] = {}
        for lowest in sorted(next(iter(self.sizes.values()))):
            if self.nbytes(dict.fromkeys(self.weights, lowest)) > budget:
                break
            for f in range(len(self.folds)):
                mixes[lowest, f] = self.allocate(budget, lowest, _sum(self.folds[:f] + self.folds[f + 1:]))
            gains[lowest] = tuple(float(self.held_out(f, uniform)) - float(self.held_out(f, mixes[lowest, f]))
                                  for f in range(len(self.folds)))
        gain, lowest, fold = max((g, lowest, f) for lowest, by_fold in gains.items() for f, g in enumerate(by_fold))
        if gain <= 0:  # (of equal gains, the fewer and wider widths)
            return Check(uniform[next(iter(uniform))], gains, None, None, uniform)
        return Check(uniform[next(iter(uniform))], gains, lowest, fold, mixes[lowest, fold])


@dataclasses.dataclass(frozen=True)
class Check:
    """What :meth:`Sensitivity.check` found at one budget.

    Attributes:
      uniform: the most bits every layer can have within the budget.
      gains: ``{lowest width: per fold, the held-out loss of uniform minus that of the allocation among
        widths >= it chosen on the other folds}`` (positive: the mix is better on data that did not choose it).
      lowest, fold: where the best positive gain is (of equal gains, the widest lowest width), or None (uniform).
      allocation: ``{path: bits}``: the allocation of the best positive gain, else every layer at ``uniform``.
    """

    uniform: int
    gains: Mapping[int, tuple[float, ...]]
    lowest: int | None
    fold: int | None
    allocation: Mapping[str, int]


def auto(sensitivity: Sensitivity, options: Auto) -> Recipe:
    """The recipe of least summed cost within ``options.bits`` average bits per weight, checked on held-out data.

    Picks one of ``options.choices`` per kernel with the exact multiple-choice knapsack
    (:func:`jaxopt_big.quant.allocate_bits`) under the budget ``floor(bits * weights / 8)`` bytes,
    scales included, each kernel's costs taken non-negative and non-increasing in bits (a wider
    width never costs more; a tie goes to it). When the sensitivity can be checked on held-out
    calibration folds (as :func:`jaxopt_big.oneshot.auto` measures it with ``folds >= 2``), the
    allocation is :meth:`Sensitivity.check`'s: among those chosen on all folds but one, the one that
    beat the widest uniform width within the budget by the most on its held-out fold, or that uniform
    width when none beat it there (never worse than uniform on held-out calibration data). Returns a
    :class:`Recipe` of one exact rule per kernel (its path escaped), after a rule that leaves the head
    and embeddings dense. Print it, or pass it to :func:`jaxopt_big.oneshot.compress`.

    Examples:
      >>> s = Sensitivity(errors={"a/kernel": {2: 9.0, 4: 1.0}, "b/kernel": {2: 2.0, 4: 1.0}},
      ...                 sizes={"a/kernel": {2: 16, 4: 32}, "b/kernel": {2: 16, 4: 32}},
      ...                 weights={"a/kernel": 64, "b/kernel": 64})
      >>> [(r.pattern, r.value.describe()) for r in auto(s, Auto(bits=3, choices=(2, 4))).rules[1:]]
      [('a/kernel', 'gptq int4 g128'), ('b/kernel', 'gptq int2 g128')]
    """
    if not isinstance(options, Auto):
        raise TypeError(f"auto needs jb.recipe.Auto options, got {type(options).__name__}")
    missing = {p: sorted(set(options.choices) - set(s)) for p, s in sensitivity.sizes.items()
               if not set(options.choices) <= set(s)}
    if missing:
        path, bits = next(iter(missing.items()))
        raise ValueError(f"{path}: no measurement for bits {bits} of Auto.choices={options.choices}")
    chosen = sensitivity.only(options.choices)
    budget = chosen.budget(options.bits)
    checked = chosen.held_out is not None and len(chosen.folds) >= 2
    allocation = chosen.check(options.bits).allocation if checked else chosen.allocate(budget)
    return Recipe([_HEAD, *(_tree.Rule(re.escape(p), options.plan(b)) for p, b in allocation.items())])


def to_toml(recipe: Recipe) -> str:
    """The recipe as a recipe file that :func:`jaxopt_big.recipe.load` reads back equal (a dense rule,
    ``value=None``, reads back as the equivalent ``Plan()``).

    Written: rules whose plan is a quantizer alone (RTN, GPTQ and their options) or dense, as
    :func:`auto` makes them; save the text and pass the file to ``jaxopt-big compress --recipe``.

    Raises:
      ValueError: a rule the file format cannot hold (a pruner, a spec field without a file key such
        as ``scale_dtype``, a recipe with its own ``where``), naming the rule's pattern.

    Examples:
      >>> print(to_toml(Recipe([_tree.Rule("layers/0/mlp/up_proj/kernel", Auto(bits=4).plan(3))])))
      [[rule]]
      pattern = "layers/0/mlp/up_proj/kernel"
      [rule.quant]
      bits = 3
      symmetric = true
      group = 128
      calibration = "mse"
      method = "gptq"
      act_order = false
      block_size = 128
      damp = 0.01
      <BLANKLINE>
    """
    if recipe.where is not _tree.KERNELS:
        raise ValueError(f"a recipe file has no 'where': cannot write a recipe whose where is {recipe.where!r}")
    return "\n".join(_rule_toml(rule) for rule in recipe.rules)


def _rule_toml(rule: _tree.Rule) -> str:
    plan = rule.value
    table: dict[str, Any] = {"pattern": rule.pattern, **({} if rule.required else {"required": False})}
    quant = None if plan is None or plan.sparsity is not None or plan.quantizer is None else _quant_table(plan)
    try:  # what the loader reads back must be the rule itself (None, dense, reads back as Plan())
        written = {**table, "quant": quant} if quant else table
        same = (plan is None or quant is not None) and _rule_of(written) == _tree.Rule(
            rule.pattern, plan or Plan(), required=rule.required)
    except ValueError:
        same = False
    if not same:
        raise ValueError(f"rule {rule.pattern!r}: {plan.describe() if plan else 'dense'} has no recipe-file form "
                         "(a file holds quantizers' bits, symmetric, granularity/group, calibration and options)")
    lines = ["[[rule]]", *(f"{k} = {_value(v)}" for k, v in table.items())]
    if quant:
        lines += ["[rule.quant]", *(f"{k} = {_value(v)}" for k, v in quant.items())]
    return "\n".join(lines) + "\n"


def _quant_table(plan: Plan) -> dict[str, Any] | None:
    quantizer = plan.quantizer
    spec = getattr(quantizer, "spec", None)
    if quantizer is None or not isinstance(spec, _quant.QuantSpec):
        return None
    granularity = spec.granularity
    table: dict[str, Any] = {"bits": spec.bits, "symmetric": spec.symmetric}
    if isinstance(granularity, _quant.Group):
        table["group"] = granularity.size
    else:
        table["granularity"] = next((k for k, g in _GRANULARITIES.items() if g == granularity), None)
    table["calibration"] = next((k for k, c in _CALIBRATIONS.items() if c() == spec.calibration), None)
    table["method"] = quantizer.name
    table.update({k: getattr(quantizer, k) for k in _options(type(quantizer))})
    return table if None not in table.values() else None


def _value(v: Any) -> str:
    """A TOML value: JSON's strings, numbers and booleans are TOML's."""
    return json.dumps(v)


def _monotone(costs: Mapping[str, Mapping[int, float]]) -> dict[str, dict[int, float]]:
    """Each kernel's costs made non-negative and non-increasing in bits. A calibration set's gradient
    term can make a width look better than float or than a wider width; that is noise the budget
    allocation would exploit (fewer bits where they seem to help), not a gain that carries to new data."""
    out: dict[str, dict[int, float]] = {}
    for path, by_bits in costs.items():
        running, out[path] = 0.0, {}
        for bits in sorted(by_bits, reverse=True):
            running = max(running, float(by_bits[bits]))
            out[path][bits] = running
    return out


def _sum(folds: tuple[Mapping[str, Mapping[int, float]], ...]) -> dict[str, dict[int, float]]:
    """The costs of several folds added up."""
    return {p: {b: sum(f[p][b] for f in folds) for b in by_bits} for p, by_bits in folds[0].items()}
