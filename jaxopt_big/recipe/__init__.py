"""Recipes: one per-layer compression plan across techniques, read by every consumer.

A :class:`Recipe` is a list of :class:`jaxopt_big.tree.Rule` whose values are :class:`Plan` s. The
same recipe drives post-training compression of a parameter tree (:meth:`Recipe.plans` gives the
plan of each leaf), the block-wise one-shot engine (:func:`jaxopt_big.oneshot.compress`),
training-time compression, and the report (planned vs achieved). This is the only layer above the
technique packages: it imports several of them, they never import it.

Methods are part of the plan. A plain sparsity (``0.5`` or ``NM(2, 4)``) prunes by magnitude; wrap it
as ``Wanda(...)`` or ``SparseGPT(...)`` to use calibration data. A plain ``QuantSpec`` rounds to
nearest (``RTN``); ``GPTQ(spec)`` quantizes with second-order error feedback; ``AWQ(...)`` and
``SmoothQuant(...)`` first migrate per-input-channel scales into the op before, then quantize.

Examples:
  >>> import jaxopt_big as jb
  >>> from jaxopt_big.tree import Rule
  >>> int4 = jb.quant.QuantSpec(bits=4, granularity=jb.quant.Group(128))
  >>> recipe = jb.Recipe([
  ...     Rule(r"layer_\\d+/mlp/.*", jb.Plan(sparsity=jb.SparseGPT(jb.sparsity.NM(2, 4)), quant=jb.GPTQ(int4))),
  ...     Rule(r".*", jb.Plan(quant=jb.quant.QuantSpec(bits=8, granularity=jb.quant.PER_CHANNEL))),
  ... ])
  >>> recipe.rules[1].value.quantizer
  RTN(spec=QuantSpec(bits=8, ...))
"""

from jaxopt_big.recipe._auto import Auto, Sensitivity, auto, to_toml
from jaxopt_big.recipe._methods import (AWQ, GPTQ, RTN, AWQScore, InputStats, Magnitude, Method, Pruner,
                                        Quantizer, SmoothQuant, SparseGPT, Wanda)
from jaxopt_big.recipe._plan import Plan, Recipe, Rotate
from jaxopt_big.recipe._presets import PRESETS, preset, with_smoothquant
from jaxopt_big.recipe._toml import RecipeFileError, load

__all__ = ["Plan", "Recipe", "Rotate", "Method", "Pruner", "Quantizer", "Magnitude", "Wanda", "SparseGPT", "RTN",
           "GPTQ", "AWQ", "AWQScore", "SmoothQuant", "InputStats", "PRESETS", "preset", "with_smoothquant", "load",
           "RecipeFileError", "Auto", "Sensitivity", "auto", "to_toml"]
