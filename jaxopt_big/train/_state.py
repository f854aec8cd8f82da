"""Training state: a pytree, so it jits, shards and checkpoints like any other."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

__all__ = ["TrainState"]


@flax.struct.dataclass
class TrainState:
    """Step counter, parameters, optimizer state, optional BatchNorm statistics and PRNG key.

    The optimizer itself is not part of the state (it is code, not data); ``make_step`` holds it.
    ``create`` copies the arrays it is given (parameters, statistics, PRNG key): the step donates
    the state's buffers, and the caller's own arrays must survive training.

    Examples:
      >>> import optax, jax.numpy as jnp
      >>> state = TrainState.create({"w": jnp.zeros(3)}, optax.sgd(0.1))
      >>> int(state.step)
      0
    """

    step: jax.Array
    params: Any
    opt_state: Any
    batch_stats: Any = None
    rng: jax.Array | None = None

    @classmethod
    def create(cls, params: Any, tx: optax.GradientTransformation, *, batch_stats: Any = None,
               rng: jax.Array | None = None) -> TrainState:
        params, batch_stats, rng = _own(params), _own(batch_stats), _own(rng)
        return cls(step=jnp.zeros([], jnp.int32), params=params, opt_state=tx.init(params),
                   batch_stats=batch_stats, rng=rng)


def _own(tree: Any) -> Any:
    """Fresh buffers (same values, same shardings) for the arrays of ``tree``."""
    return jax.tree.map(lambda x: jnp.copy(x) if isinstance(x, jax.Array) else x, tree)
