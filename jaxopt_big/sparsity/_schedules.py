"""Sparsity schedules: optax-style ``step -> sparsity`` functions, traceable under jit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

__all__ = ["polynomial_schedule", "constant_schedule", "one_shot"]


def _fraction(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a sparsity in [0, 1), got {value!r}")
    return float(value)


def _step(name: str, value: int) -> int:
    if not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


def constant_schedule(sparsity: float) -> optax.Schedule:
    """The same sparsity at every step.

    Examples:
      >>> float(constant_schedule(0.8)(123))
      0.8
    """
    s = _fraction("sparsity", sparsity)
    return lambda count: jnp.full([], s, jnp.float32)


def one_shot(sparsity: float, *, step: int = 0) -> optax.Schedule:
    """0 before ``step``, ``sparsity`` from ``step`` on (prune once, then keep the mask).

    Examples:
      >>> f = one_shot(0.9, step=10)
      >>> float(f(9)), float(f(10))
      (0.0, 0.9)
    """
    s, at = _fraction("sparsity", sparsity), _step("step", step)
    return lambda count: jnp.where(jnp.asarray(count) >= at, jnp.float32(s), jnp.float32(0))


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
    s_f, s_i = _fraction("final_sparsity", final_sparsity), _fraction("init_sparsity", init_sparsity)
    begin, end, every = _step("begin_step", begin_step), _step("end_step", end_step), _step("update_every", update_every)
    if end <= begin or every < 1:
        raise ValueError(f"polynomial_schedule needs begin_step < end_step and update_every >= 1, got "
                         f"begin_step={begin}, end_step={end}, update_every={every}")
    if not isinstance(power, (int, float)) or power <= 0:
        raise ValueError(f"power must be positive, got {power!r}")

    def schedule(count: jax.Array) -> jax.Array:
        count = jnp.asarray(count)
        done = (count - begin) // every * every
        p = jnp.clip(done.astype(jnp.float32) / (end - begin), 0.0, 1.0)
        s = s_f + (s_i - s_f) * (1.0 - p) ** power
        return jnp.where(count < begin, jnp.float32(0), s).astype(jnp.float32)

    return schedule
