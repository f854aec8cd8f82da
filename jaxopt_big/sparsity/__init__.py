"""Pruning and sparse training: scores, exact masks, schedules, optax wrappers, packed storage."""

from jaxopt_big.sparsity.masks import (ERK, NM, Block, Channel, Scope, Uniform, Unstructured, apply_masks,
                                       erk_densities, global_threshold, make_masks, sparsity)
from jaxopt_big.sparsity.scores import magnitude, random, saliency

__all__ = ["magnitude", "saliency", "random", "Scope", "Uniform", "ERK", "Unstructured", "NM", "Block", "Channel",
           "make_masks", "global_threshold", "apply_masks", "sparsity", "erk_densities"]
