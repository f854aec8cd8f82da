"""Automatic mixed precision measured by the engine: ``auto(model, params, batches, jb.recipe.Auto(bits=4.25))``."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import jax

from jaxopt_big import leaves as _leaves
from jaxopt_big import quant as _quant
from jaxopt_big import recipe as _recipe
from jaxopt_big.oneshot import _engine, _model

__all__ = ["auto"]


def auto(model_or_apply: Any, params: Any, calibration_batches: Iterable[Any], options: _recipe.Auto, *,
         blocks: str | None = None, mesh: Any = None, progress: bool = True,
         row_mask: Callable[[Any], jax.typing.ArrayLike] | None = None, sequential: bool = False,
         data_axis: str = "data") -> tuple[_recipe.Recipe, _recipe.Sensitivity]:
    """Measures each layer's output error at every bit width of ``options``, then picks bits per layer.

    The measurement is the engine's own: one :func:`compress` run per choice with every block linear at
    that width (``options.uniform(bits)``), so with the default choices (2, 3, 4, 5, 6, 8) 6 runs of 2 block
    passes each, 8 block passes per block in all. A layer's error at a width is the absolute output
    error ``tr(D^T H D)`` = relative error x output energy ``tr(W^T H W)`` (``LayerRow.error * .energy``),
    on its calibration inputs as that run saw them (the layers before it at the same width); summed over
    a stacked kernel's layers. Its bytes at each width are those the quantized leaf stores (codes and
    scales, :func:`jaxopt_big.quant.layer_bytes`). Then :func:`jaxopt_big.recipe.auto` allocates.

    Args:
      model_or_apply, params, calibration_batches, blocks, mesh, progress, row_mask, sequential,
        data_axis: as for :func:`compress`.
      options: the budget and the choices (:class:`jaxopt_big.recipe.Auto`).

    Returns:
      ``(recipe, sensitivity)``: one exact rule per kernel, to pass to :func:`compress`; and the
      measurements, to allocate again at another budget without measuring
      (``jb.recipe.auto(sensitivity, jb.recipe.Auto(bits=...))``).

    Raises:
      ValueError: ``options.bits`` outside what the choices reach on the model's layers (after the
        first run, which finds the layers), and whatever :func:`compress` raises.

    Examples:
      >>> import flax.linen as nn, jax, jaxopt_big as jb
      >>> class Block(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         return x + nn.Dense(128, name="dense")(x)
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         return Block(name="layer_1")(Block(name="layer_0")(x))
      >>> x = jax.random.normal(jax.random.key(0), (64, 128))
      >>> params = Net().init(jax.random.key(1), x)["params"]
      >>> rtn = jb.RTN(jb.quant.QuantSpec(bits=4, granularity=jb.quant.Group(128)))  # default: GPTQ, MSE grid
      >>> options = jb.recipe.Auto(bits=6.25, choices=(4, 8), quantizer=rtn)
      >>> recipe, s = auto(Net(), params, [x], options, progress=False)
      >>> sorted(r.value.describe() for r in recipe.rules[1:]), s.average_bits({p: 4 for p in s.weights})
      (['rtn int4 g128', 'rtn int8 g128'], 4.25)
    """
    if not isinstance(options, _recipe.Auto):
        raise TypeError(f"auto needs jb.recipe.Auto options, got {type(options).__name__}")
    batches = list(calibration_batches)
    flat = _model.wrap(model_or_apply, params).flat()
    errors: dict[str, dict[int, float]] = {}
    sizes: dict[str, dict[int, int]] = {}
    kernels: dict[str, Any] = {}
    for bits in options.choices:
        _, report = _engine.compress(model_or_apply, params, batches, options.uniform(bits), blocks=blocks, mesh=mesh,
                                     progress=progress, row_mask=row_mask, sequential=sequential, data_axis=data_axis)
        for row in report.rows:
            layer = errors.setdefault(_kernel_path(row.path, flat), {})
            layer[bits] = layer.get(bits, 0.0) + row.error * row.energy
        if not sizes:  # the first run found the layers: a budget they cannot meet fails now, not after all runs
            kernels = _leaves.densify({p: flat[p] for p in errors})
            sizes = _quant.layer_bytes(kernels, bits=options.choices, spec=options.spec,
                                       where=lambda p, x: True)
            _recipe.Sensitivity({p: dict.fromkeys(options.choices, 0.0) for p in sizes}, sizes,
                                _weights(kernels)).budget(options.bits)
    sensitivity = _recipe.Sensitivity(errors, sizes, _weights(kernels))
    return _recipe.auto(sensitivity, options), sensitivity


def _weights(kernels: dict[str, Any]) -> dict[str, int]:
    return {p: int(x.size) for p, x in kernels.items()}


def _kernel_path(label: str, flat: dict[str, Any]) -> str:
    """The kernel leaf of a report row: ``layers[3]/mlp/up`` (a stacked layer) -> ``layers/mlp/up/kernel``."""
    path = re.sub(r"\[\d+\]", "", label) + "/kernel"
    if path not in flat:
        raise ValueError(f"{label}: no kernel leaf {path!r} in the parameters")  # a report row names its kernel
    return path
