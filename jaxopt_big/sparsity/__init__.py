"""Pruning and sparse training: scores, exact masks, schedules, optax wrappers, packed storage."""

from jaxopt_big import _deprecation
from jaxopt_big.sparsity._calibrated import (sparsegpt, sparsegpt_kernel, sparsegpt_params, wanda, wanda_kernel,
                                             wanda_params)
from jaxopt_big.sparsity._dynamic import Start, drop_fraction_at, rigl, set_
from jaxopt_big.sparsity._masks import (ERK, NM, Channel, Scope, Tile, Uniform, Unstructured, apply_masks,
                                       erk_densities, global_threshold, make_masks, sparsity)
from jaxopt_big.sparsity._packed import PackedSparse, pack, pack_array, pack_params, unpack
from jaxopt_big.sparsity._schedules import constant_schedule, one_shot, polynomial_schedule, step_schedule
from jaxopt_big.sparsity._scores import magnitude, random, saliency
from jaxopt_big.sparsity._transform import PruneState, prune

__all__ = ["magnitude", "saliency", "random", "Scope", "Uniform", "ERK", "Unstructured", "NM", "Tile", "Channel",
           "make_masks", "global_threshold", "apply_masks", "sparsity", "erk_densities", "polynomial_schedule",
           "constant_schedule", "step_schedule", "one_shot", "PruneState", "prune", "set_", "rigl",
           "drop_fraction_at", "Start", "PackedSparse", "pack_params", "pack_array", "pack", "unpack",
           "wanda_params", "wanda_kernel", "sparsegpt_params", "sparsegpt_kernel", "wanda", "sparsegpt"]

# Old names of classes, kept for one release (``_deprecation.alias`` wraps functions, which would
# break ``isinstance``); not in ``__all__`` so that star imports and the API docs do not warn.
__getattr__ = _deprecation.renamed("jb.sparsity", {"Block": (Tile, "jb.sparsity.Tile")})
