"""The legacy ``jax.pmap`` path (Colab TPU notebooks); ``make_step(mesh=...)`` is the main path."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

from jaxopt_big.train import _state, _step

__all__ = ["pmap_step", "replicate", "unreplicate", "split_batch"]


def replicate(tree: Any, devices: list[jax.Device] | None = None) -> Any:
    """Copies ``tree`` to every device with a leading device axis (the layout ``pmap`` expects).

    Examples:
      >>> replicate({"w": np.ones(2)})["w"].shape == (jax.local_device_count(), 2)
      True
    """
    devices = devices or jax.local_devices()
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), ("devices",)), jax.P("devices"))
    stack = lambda x: jax.numpy.broadcast_to(x, (len(devices), *np.shape(x)))
    return jax.device_put(jax.tree.map(stack, tree), sharding)


def unreplicate(tree: Any) -> Any:
    """The first device's copy of a replicated tree.

    Examples:
      >>> unreplicate(replicate({"w": np.ones(2)}))["w"].shape
      (2,)
    """
    return jax.tree.map(lambda x: x[0], tree)


def split_batch(batch: Any, n: int | None = None) -> Any:
    """Reshapes ``[B, ...]`` leaves to ``[n, B / n, ...]`` (``n`` = local device count by default).

    Examples:
      >>> split_batch(np.zeros((16, 3)), 8).shape
      (8, 2, 3)
    """
    n = n or jax.local_device_count()

    def split(keypath, x):
        size = np.shape(x)[0] if np.ndim(x) else None
        if size is None or size % n:
            raise ValueError(f"batch leaf {jax.tree_util.keystr(keypath) or '<root>'}: leading size {size} is not "
                             f"divisible by {n} devices")
        return np.reshape(x, (n, size // n, *np.shape(x)[1:]))
    return jax.tree_util.tree_map_with_path(split, batch)


def pmap_step(loss_fn: Callable[..., Any], tx: optax.GradientTransformation, *, accum_steps: int = 1,
              compute_dtype: Any = None, axis_name: str = "batch", donate: bool = True
              ) -> Callable[[_state.TrainState, Any], tuple[_state.TrainState, dict[str, jax.Array]]]:
    """``jax.pmap`` data-parallel ``step(state, batch) -> (state, metrics)``.

    ``state`` is replicated (:func:`replicate`) and ``batch`` split per device (:func:`split_batch`);
    gradients, metrics and BatchNorm statistics are averaged over ``axis_name`` with ``pmean``, so
    the step equals the single-device step on the whole batch. Metrics come back per device.

    Examples:
      >>> import optax, jax.numpy as jnp
      >>> tx = optax.sgd(0.5)
      >>> step = pmap_step(lambda p, b: (((p - b) ** 2).mean(), {}), tx)
      >>> state = replicate(_state.TrainState.create(jnp.zeros(()), tx))
      >>> state, metrics = step(state, split_batch(np.ones(16, np.float32)))
      >>> float(unreplicate(state.params))
      1.0
    """
    def step(state, batch):
        grads, metrics, stats = _step.grads_and_metrics(loss_fn, state, batch, accum_steps=accum_steps,
                                                        compute_dtype=compute_dtype)
        grads, metrics, stats = jax.lax.pmean((grads, metrics, stats), axis_name)
        return _step.apply_gradients(tx, state, grads, stats), metrics

    return jax.pmap(step, axis_name=axis_name, donate_argnums=(0,) if donate else ())
