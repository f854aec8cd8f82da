"""Jitted optax training steps."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxopt_big.train.state import TrainState

__all__ = ["make_step", "classifier_loss"]

LossFn = Callable[[Any, Any], tuple[jax.Array, dict[str, jax.Array]]]


def classifier_loss(apply_fn: Callable[..., jax.Array]) -> LossFn:
    """Softmax cross-entropy loss ``(params, (x, y)) -> (loss, {"accuracy": ...})`` for ``apply_fn``.

    ``apply_fn(params, x)`` returns logits; ``params`` is whatever the step trains.

    Examples:
      >>> import jax.numpy as jnp
      >>> loss_fn = classifier_loss(lambda p, x: x @ p)
      >>> loss, aux = loss_fn(jnp.eye(2), (jnp.array([[9.0, 0.0]]), jnp.array([0])))
      >>> float(aux["accuracy"])
      1.0
    """
    def loss_fn(params, batch):
        x, y = batch
        logits = apply_fn(params, x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, {"accuracy": (logits.argmax(-1) == y).mean()}
    return loss_fn


def make_step(loss_fn: LossFn, tx: optax.GradientTransformation, *, donate: bool = True
              ) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]:
    """A jitted ``step(state, batch) -> (state, metrics)`` for ``loss_fn(params, batch) -> (loss, aux)``.

    The state's buffers are donated (updated in place) unless ``donate=False``. The transform gets
    the current params as its ``params`` argument, so wrappers such as pruning can read them.

    Examples:
      >>> import optax, jax.numpy as jnp
      >>> loss_fn = lambda p, b: (((p["w"] - b) ** 2).sum(), {})
      >>> tx = optax.sgd(0.5)
      >>> step = make_step(loss_fn, tx)
      >>> state, metrics = step(TrainState.create({"w": jnp.zeros(2)}, tx), jnp.ones(2))
      >>> state.params["w"].tolist(), float(metrics["loss"])
      ([1.0, 1.0], 2.0)
    """
    def step(state: TrainState, batch: Any):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new, {"loss": loss, **aux}

    return jax.jit(step, donate_argnums=(0,) if donate else ())
