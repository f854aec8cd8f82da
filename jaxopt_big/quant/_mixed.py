"""Mixed precision by sensitivity: per-layer loss increase at each bit width, and an exact bit
allocation under a bytes budget (multiple-choice knapsack by dynamic programming)."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxopt_big import _checks
from jaxopt_big import tree as _tree
from jaxopt_big.quant import _spec

__all__ = ["sensitivity", "layer_bytes", "allocate_bits", "allocation_rules"]

DEFAULT_SPEC = _spec.QuantSpec(bits=8, granularity=_spec.PER_CHANNEL)


def _check_bits(bits: Sequence[int]) -> tuple[int, ...]:
    if not bits:
        raise ValueError(f"bits must be a non-empty sequence of ints, got {bits!r}")
    return tuple(sorted({_checks.integer("bits", b) for b in bits}))


def _scalar_loss(loss_fn: Callable[..., Any]) -> Callable[..., jax.Array]:
    def loss(params, batch):
        out = loss_fn(params, batch)
        return out[0] if isinstance(out, tuple) else out
    return jax.jit(loss)


def sensitivity(loss_fn: Callable[[Any, Any], Any], params: Any, batch: Any, *, bits: Sequence[int] = (2, 4, 8),
                spec: _spec.QuantSpec = DEFAULT_SPEC, where: _tree.Where = _tree.KERNELS
                ) -> dict[str, dict[int, float]]:
    """Loss increase on ``batch`` when one selected layer alone is fake-quantized at each bit width.

    Args:
      loss_fn: ``(params, batch) -> loss`` or ``-> (loss, aux)``.
      params: parameter pytree.
      batch: calibration batch.
      bits: bit widths to try.
      spec: grid, granularity and calibration (its ``bits`` is replaced by each width).
      where: layers to measure (default: kernels).

    Returns:
      ``{path: {bits: loss(quantized) - loss(float)}}``.

    Examples:
      >>> import jax.numpy as jnp
      >>> p = {"a": {"kernel": jnp.array([[0.3], [-1.0]])}, "b": {"kernel": jnp.array([[0.5], [2.0]])}}
      >>> s = sensitivity(lambda p, x: (p["a"]["kernel"] ** 2).sum() + 0 * p["b"]["kernel"].sum(), p, None, bits=(2,))
      >>> round(s["a/kernel"][2], 2), s["b/kernel"][2]
      (-0.09, 0.0)
    """
    bits = _check_bits(bits)
    loss = _scalar_loss(loss_fn)
    base = float(loss(params, batch))
    paths = [p for p, _, _ in _tree.assigned(params, True, where=where, what="where")]
    out: dict[str, dict[int, float]] = {}
    for path in paths:
        out[path] = {}
        for b in bits:
            trial = _fake_quant_one(params, path, dataclasses.replace(spec, bits=b))
            out[path][b] = float(loss(trial, batch)) - base
    return out


def _fake_quant_one(params: Any, path: str, fmt: _spec.QuantSpec) -> Any:
    """``params`` with only the leaf at ``path`` fake-quantized by ``fmt``."""
    return _tree.map_with_path(lambda p, x: fmt.fake_quant(x, path=p) if p == path else x, params)


def layer_bytes(params: Any, *, bits: Sequence[int] = (2, 4, 8), spec: _spec.QuantSpec = DEFAULT_SPEC,
                where: _tree.Where = _tree.KERNELS) -> dict[str, dict[int, int]]:
    """True bytes of each selected layer quantized at each width (packed values plus scales).

    Examples:
      >>> import jax.numpy as jnp
      >>> layer_bytes({"d": {"kernel": jnp.ones((8, 4))}}, bits=(2, 8))
      {'d/kernel': {2: 24, 8: 48}}
    """
    bits = _check_bits(bits)
    return {path: {b: int(jax.eval_shape(dataclasses.replace(spec, bits=b).quantize, x).nbytes)
                   for b in bits}
            for path, x, _ in _tree.assigned(params, True, where=where, what="where")}


def _costs(path: str, size: int | Mapping[int, int], bits: Sequence[int]) -> dict[int, int]:
    if isinstance(size, Mapping):
        missing = [b for b in bits if b not in size]
        if missing:
            raise ValueError(f"{path}: sizes has no bytes for bits {missing}; it has {sorted(size)}")
        costs = {b: size[b] for b in bits}
    else:
        size = _checks.integer(f"{path}: size (weights)", size, low=0)  # np.prod(shape) is a numpy int
        costs = {b: math.ceil(size * b / 8) for b in bits}
    return {b: _checks.integer(f"{path}: size at {b} bits (bytes)", c, low=0) for b, c in costs.items()}


def allocate_bits(sensitivities: Mapping[str, Mapping[int, float]], sizes: Mapping[str, int | Mapping[int, int]],
                  budget_bytes: int) -> dict[str, int]:
    """Bits per layer minimising the summed sensitivity with total bytes ``<= budget_bytes``; exact.

    A multiple-choice knapsack solved by dynamic programming over the budget in units of the
    greatest common divisor of all costs: ``O(layers * choices * budget / gcd)`` time.

    Args:
      sensitivities: ``{path: {bits: loss increase}}`` (e.g. from :func:`sensitivity`); the bit
        choices of a layer are its keys.
      sizes: ``{path: number of weights}`` (bytes ``ceil(n * bits / 8)``) or
        ``{path: {bits: bytes}}`` (e.g. from :func:`layer_bytes`, scales included).
      budget_bytes: total bytes allowed for these layers.

    Returns:
      ``{path: bits}``.

    Raises:
      ValueError: the budget is below the smallest possible model; a path of one mapping is
        missing from the other; a sensitivity is not finite.

    Examples:
      >>> sens = {"a": {2: 5.0, 8: 0.0}, "b": {2: 1.0, 8: 0.0}}
      >>> allocate_bits(sens, {"a": 8, "b": 8}, budget_bytes=10)
      {'a': 8, 'b': 2}
    """
    if set(sensitivities) != set(sizes):
        odd = sorted(set(sensitivities) ^ set(sizes))
        raise ValueError(f"sensitivities and sizes must have the same paths; only in one of them: {odd}")
    budget_bytes = _checks.integer("budget_bytes", budget_bytes)
    paths = list(sensitivities)
    choices, costs, sens = [], [], []
    for path in paths:
        bits = _check_bits(list(sensitivities[path]))
        cost = _costs(path, sizes[path], bits)
        for b in bits:
            if not math.isfinite(sensitivities[path][b]):
                raise ValueError(f"{path}: sensitivity at {b} bits is not finite: {sensitivities[path][b]!r}")
        choices.append(bits)
        costs.append([cost[b] for b in bits])
        sens.append([float(sensitivities[path][b]) for b in bits])
    smallest = sum(min(c) for c in costs)
    if budget_bytes < smallest:
        raise ValueError(f"budget_bytes={budget_bytes} is below the smallest possible model: {smallest} bytes "
                         f"(every layer at its fewest bits)")
    unit = math.gcd(*[c for cs in costs for c in cs]) or 1
    capacity = int(budget_bytes) // unit
    best = np.zeros(capacity + 1)  # least summed sensitivity of the layers so far within each capacity
    picks = np.zeros((len(paths), capacity + 1), np.int16)
    for i, (cs, ss) in enumerate(zip(costs, sens)):
        new = np.full(capacity + 1, np.inf)
        for j, (c, s) in enumerate(zip(cs, ss)):
            c //= unit
            if c > capacity:
                continue
            cand = np.full(capacity + 1, np.inf)
            cand[c:] = best[: capacity + 1 - c] + s
            better = cand <= new  # a tie goes to the wider choice (bits are in increasing order)
            new[better], picks[i, better] = cand[better], j
        best = new
    out, room = {}, capacity
    for i in reversed(range(len(paths))):
        j = int(picks[i, room])
        out[paths[i]] = choices[i][j]
        room -= costs[i][j] // unit
    return {p: out[p] for p in paths}


def allocation_rules(allocation: Mapping[str, int], spec: _spec.QuantSpec = DEFAULT_SPEC
                     ) -> list[_tree.Rule[_spec.QuantSpec]]:
    """Rules for ``quantize_params``/``fake_quant_params``/``qat`` from ``{path: bits}``.

    Examples:
      >>> [(r.pattern, r.value.bits) for r in allocation_rules({"Dense_0/kernel": 4})]
      [('Dense_0/kernel', 4)]
    """
    return [_tree.Rule(re.escape(path), dataclasses.replace(spec, bits=b)) for path, b in allocation.items()]
