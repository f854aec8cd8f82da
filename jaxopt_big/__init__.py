"""jaxopt_big: make JAX models smaller and cheaper to train and serve.

Pure functions on pytrees and optax transforms for pruning, quantization, low-rank factorization,
weight sharing and distillation, with jitted training, device meshes, checkpoints and reports.

Examples:
  >>> import jaxopt_big as jb
  >>> jb.tree.paths({"Dense_0": {"kernel": 0}})
  ['Dense_0/kernel']
"""

from jaxopt_big import (calibration, checkpoint, data, distill, export, hf, intercept, leaves, lowrank, models,
                        oneshot, parallel, quant, recipe, report, sparsity, train, tree, zoo)
from jaxopt_big.recipe import AWQ, GPTQ, RTN, Magnitude, Plan, Recipe, SmoothQuant, SparseGPT, Wanda
from jaxopt_big.tree import Rule

__version__ = "0.1.0"
__all__ = ["calibration", "checkpoint", "data", "distill", "export", "hf", "intercept", "leaves", "lowrank", "models",
           "oneshot", "parallel", "quant", "recipe", "report", "sparsity", "train", "tree", "zoo",
           "Rule", "Recipe", "Plan", "Magnitude", "Wanda", "SparseGPT", "RTN", "GPTQ", "AWQ", "SmoothQuant"]
