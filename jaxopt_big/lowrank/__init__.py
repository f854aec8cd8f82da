"""Low-rank factorization (truncated / randomized SVD) and LoRA adapters with merge/unmerge.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> w = jax.random.normal(jax.random.key(0), (16, 16))
  >>> factorize(w, max_params=128).rank
  4
"""

from jaxopt_big.lowrank._apply import apply, densify
from jaxopt_big.lowrank._factorize import Factorization, LowRank, factorize, factorize_params
from jaxopt_big.lowrank._lora import (LoRA, lora_combine, lora_init, lora_labels, lora_merge, lora_partition,
                                     lora_trainable, lora_unmerge)

__all__ = ["Factorization", "LoRA", "LowRank", "apply", "densify", "factorize", "factorize_params", "lora_combine",
           "lora_init", "lora_labels", "lora_merge", "lora_partition", "lora_trainable", "lora_unmerge"]
