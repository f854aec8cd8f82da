"""Sparsity schedules: optax-style ``step -> sparsity`` functions, traceable under jit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxopt_big import _checks, _deprecation

__all__ = ["polynomial_schedule", "constant_schedule", "step_schedule", "one_shot"]


def constant_schedule(sparsity: float) -> optax.Schedule:
    """The same sparsity at every step.

    Examples:
      >>> float(constant_schedule(0.8)(123))
      0.8
    """
    s = float(_checks.fraction("sparsity", sparsity))
    return lambda count: jnp.full([], s, jnp.float32)


def step_schedule(sparsity: float, *, step: int = 0) -> optax.Schedule:
    """0 before ``step``, ``sparsity`` from ``step`` on (prune once, then keep the mask).

    Examples:
      >>> f = step_schedule(0.9, step=10)
      >>> float(f(9)), float(f(10))
      (0.0, 0.9)
    """
    s, at = float(_checks.fraction("sparsity", sparsity)), _checks.integer("step", step, low=0)
    return lambda count: jnp.where(jnp.asarray(count) >= at, jnp.float32(s), jnp.float32(0))


one_shot = _deprecation.alias(step_schedule, "jb.sparsity.one_shot", "jb.sparsity.step_schedule")


def polynomial_schedule(*, final_sparsity: float, begin_step: int, end_step: int, init_sparsity: float = 0.0,
                        update_every: int = 1, power: float = 3.0) -> optax.Schedule:
    """Gradual pruning of Zhu & Gupta (2017): ``s_f + (s_i - s_f) * (1 - p) ** power``.

    ``p`` is the progress from ``begin_step`` to ``end_step``, advanced only every ``update_every``
    steps (so the sparsity is constant between mask updates). Before ``begin_step`` the sparsity
    is 0, after ``end_step`` it is ``final_sparsity``.

    Examples:
      >>> f = polynomial_schedule(final_sparsity=0.9, begin_step=0, end_step=100)
      >>> [round(float(f(t)), 4) for t in (0, 50, 100, 200)]
      [0.0, 0.7875, 0.9, 0.9]
    """
    s_f = float(_checks.fraction("final_sparsity", final_sparsity))
    s_i = float(_checks.fraction("init_sparsity", init_sparsity))
    begin, end = _checks.integer("begin_step", begin_step, low=0), _checks.integer("end_step", end_step, low=0)
    every = _checks.integer("update_every", update_every, low=1)
    if end <= begin:
        raise ValueError(f"polynomial_schedule needs begin_step < end_step, got begin_step={begin}, end_step={end}")
    power = _checks.number("power", power, above=0)

    def schedule(count: jax.Array) -> jax.Array:
        count = jnp.asarray(count)
        done = (count - begin) // every * every
        p = jnp.clip(done.astype(jnp.float32) / (end - begin), 0.0, 1.0)
        s = s_f + (s_i - s_f) * (1.0 - p) ** power
        return jnp.where(count < begin, jnp.float32(0), s).astype(jnp.float32)

    return schedule
