"""Jitted optax training steps: accumulation, mixed precision, BatchNorm statistics, meshes."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxopt_big import _batch_sharding
from jaxopt_big import _checks
from jaxopt_big.train._state import TrainState

__all__ = ["make_step", "classifier_loss", "grads_and_metrics", "apply_gradients"]

LossFn = Callable[..., tuple[jax.Array, dict[str, Any]]]
Step = Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]


def classifier_loss(apply_fn: Callable[..., Any], *, batch_stats: bool = False,
                    label_smoothing: float = 0.0) -> LossFn:
    """Softmax cross-entropy loss ``(params, (x, y)) -> (loss, {"accuracy": ...})`` for ``apply_fn``.

    ``apply_fn(params, x)`` returns logits; ``label_smoothing`` in [0, 1) mixes the one-hot targets
    with the uniform distribution. With ``batch_stats=True`` (BatchNorm models) it is
    ``apply_fn(params, batch_stats, x) -> (logits, new_batch_stats)`` and the loss reports the new
    statistics under ``aux["batch_stats"]``, which ``make_step`` moves into the state.

    Examples:
      >>> import jax.numpy as jnp
      >>> loss_fn = classifier_loss(lambda p, x: x @ p)
      >>> loss, aux = loss_fn(jnp.eye(2), (jnp.array([[9.0, 0.0]]), jnp.array([0])))
      >>> float(aux["accuracy"])
      1.0
    """
    label_smoothing = _checks.fraction("label_smoothing", label_smoothing)
    batch_stats = _checks.flag("classifier_loss.batch_stats", batch_stats)

    def metrics(logits, y):
        if label_smoothing:
            targets = optax.smooth_labels(jax.nn.one_hot(y, logits.shape[-1]), label_smoothing)
            loss = optax.softmax_cross_entropy(logits, targets).mean()
        else:
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, {"accuracy": (logits.argmax(-1) == y).mean()}

    if not batch_stats:
        def loss_fn(params, batch):
            x, y = batch
            return metrics(apply_fn(params, x), y)
        return loss_fn

    def loss_with_stats(params, batch, *, batch_stats):
        x, y = batch
        logits, new_stats = apply_fn(params, batch_stats, x)
        loss, aux = metrics(logits, y)
        return loss, {**aux, "batch_stats": new_stats}
    return loss_with_stats


def _cast(tree: Any, dtype: Any) -> Any:
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree)


def _microbatches(batch: Any, accum_steps: int) -> Any:
    """``[B, ...] -> [accum, B / accum, ...]`` taking rows ``i::accum`` into microbatch ``i``.

    Strided rows keep every microbatch spread over all devices when ``B`` is sharded.
    """
    def split(path, x):
        n = x.shape[0] if x.ndim else None
        if n is None or n % accum_steps:
            raise ValueError(f"batch leaf {jax.tree_util.keystr(path) or '<root>'}: leading size {n} is not "
                             f"divisible by accum_steps={accum_steps}")
        return x.reshape(n // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)
    return jax.tree_util.tree_map_with_path(split, batch)


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no signature to read (some C callables): the call will tell
        return True
    return any(p.kind is p.VAR_KEYWORD or (p.name == name and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
               for p in parameters)


def _loss_and_aux(out: Any) -> tuple[jax.Array, dict[str, Any]]:
    """``loss_fn``'s output checked to be ``(scalar loss, dict of metrics)``: said at trace time, not deep in jax."""
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping)):
        got = (f"an array of shape {out.shape}" if hasattr(out, "shape")  # a traced value's repr says little
               else f"a {type(out).__name__} of {len(out)}" if isinstance(out, (tuple, list)) else repr(out))
        raise TypeError(f"loss_fn must return (loss, aux): a scalar loss and a dict of metrics (may be empty, "
                        f"as in `return loss, {{}}`), got {got}")
    loss, aux = out
    if jnp.ndim(loss) != 0:
        raise ValueError(f"loss_fn must return a scalar loss (a batch mean), got shape {jnp.shape(loss)}")
    return loss, dict(aux)


def _check_keywords(loss_fn: LossFn, state: TrainState) -> None:
    """The state's optional parts are passed as keywords: say so before the call fails inside jit."""
    for name, how in (("batch_stats", "TrainState.create(..., batch_stats=)"), ("rng", "TrainState.create(..., rng=)")):
        if getattr(state, name) is not None and not _accepts(loss_fn, name):
            raise TypeError(f"the state carries {name} ({how}), so loss_fn must accept a {name}= keyword "
                            f"argument; add `*, {name}` to its signature or create the state without it")


def grads_and_metrics(loss_fn: LossFn, state: TrainState, batch: Any, *, accum_steps: int = 1,
                      compute_dtype: Any = None) -> tuple[Any, dict[str, jax.Array], Any]:
    """Mean gradients, metrics and updated BatchNorm statistics of one (accumulated) step.

    The gradients are those of the mean loss over ``accum_steps`` equal microbatches, which is the
    gradient of the big batch for losses that are batch means. Parameters and floating inputs are
    cast to ``compute_dtype`` inside the differentiated function, so gradients come back in the
    parameters' (master) dtype. BatchNorm statistics are threaded through the microbatches in order.

    Returns:
      ``(grads, metrics, batch_stats)``; ``metrics`` holds ``loss`` and the loss's aux values.

    Examples:
      >>> import optax, jax.numpy as jnp
      >>> state = TrainState.create({"w": jnp.zeros(2)}, optax.sgd(1.0))
      >>> loss_fn = lambda p, b: (((p["w"] - b) ** 2).mean(), {})
      >>> g, m, _ = grads_and_metrics(loss_fn, state, jnp.ones((4, 2)), accum_steps=2)
      >>> g["w"].tolist(), float(m["loss"])
      ([-1.0, -1.0], 1.0)
    """
    accum_steps = _checks.integer("accum_steps", accum_steps, low=1)
    _check_keywords(loss_fn, state)

    def one(params, batch_stats, micro, index):
        def f(p):
            kwargs = {}
            if batch_stats is not None:
                kwargs["batch_stats"] = batch_stats
            if state.rng is not None:
                kwargs["rng"] = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), index)
            b = micro
            if compute_dtype is not None:
                p, b = _cast(p, compute_dtype), _cast(micro, compute_dtype)
            loss, aux = _loss_and_aux(loss_fn(p, b, **kwargs))
            new_stats = aux.pop("batch_stats", None)
            if batch_stats is not None and new_stats is None:
                raise ValueError("the state has batch_stats, so loss_fn must return aux['batch_stats']")
            return loss.astype(jnp.float32), ({"loss": loss, **aux}, new_stats)
        (_, (metrics, new_stats)), grads = jax.value_and_grad(f, has_aux=True)(params)
        metrics = _cast(metrics, jnp.float32)
        return grads, metrics, new_stats

    if accum_steps == 1:
        return one(state.params, state.batch_stats, batch, 0)

    def body(carry, xs):
        grad_sum, stats = carry
        micro, index = xs
        grads, metrics, stats = one(state.params, stats, micro, index)
        return (jax.tree.map(jnp.add, grad_sum, grads), stats), metrics

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grad_sum, stats), metrics = jax.lax.scan(
        body, (zeros, state.batch_stats), (_microbatches(batch, accum_steps), jnp.arange(accum_steps)))
    mean = lambda t: jax.tree.map(lambda x: x / accum_steps, t)
    return mean(grad_sum), jax.tree.map(lambda x: x.mean(0), metrics), stats


def apply_gradients(tx: optax.GradientTransformation, state: TrainState, grads: Any,
                    batch_stats: Any = None) -> TrainState:
    """One optimizer update; ``tx`` gets the current params (so ExtraArgs wrappers can read them).

    Examples:
      >>> import optax, jax.numpy as jnp
      >>> tx = optax.sgd(0.5)
      >>> state = apply_gradients(tx, TrainState.create({"w": jnp.ones(2)}, tx), {"w": jnp.ones(2)})
      >>> state.params["w"].tolist(), int(state.step)
      ([0.5, 0.5], 1)
    """
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return dataclasses.replace(state, step=state.step + 1, params=params, opt_state=opt_state,
                               batch_stats=state.batch_stats if batch_stats is None else batch_stats)


def _gathering(loss_fn: LossFn, *, fsdp_axis: str) -> LossFn:
    """Under ``Explicit`` axes, all-gathers FSDP-split parameters before the forward pass.

    (``Auto`` axes leave this to XLA.) The gradient of the gather is a reduce-scatter, so gradients
    come back split like the parameters.
    """
    def drop(entry):
        if isinstance(entry, tuple):
            kept = tuple(a for a in entry if a != fsdp_axis)
            return kept or None
        return None if entry == fsdp_axis else entry

    def gather(x):
        spec = jax.typeof(x).sharding.spec
        new = jax.P(*(drop(e) for e in spec))
        return x if new == spec else jax.sharding.reshard(x, new)

    @functools.wraps(loss_fn)  # keeps loss_fn's signature, which the keyword check reads
    def gathered(params, batch, **kwargs):
        return loss_fn(jax.tree.map(gather, params), batch, **kwargs)
    return gathered


def make_step(loss_fn: LossFn, tx: optax.GradientTransformation, *, accum_steps: int = 1, donate: bool = True,
              mesh: jax.sharding.Mesh | None = None, compute_dtype: Any = None,
              batch_axes: tuple[str, ...] = ("data", "fsdp")) -> Step:
    """A jitted ``step(state, batch) -> (state, metrics)`` for ``loss_fn(params, batch) -> (loss, aux)``.

    Args:
      loss_fn: returns a scalar batch-mean loss and a dict of metrics. When the state carries
        ``batch_stats`` it is called with ``batch_stats=`` and must return the new statistics as
        ``aux["batch_stats"]``; when the state carries ``rng`` it gets ``rng=`` (a fresh key per
        step and microbatch).
      tx: any optax transform; it gets the current params as its ``params`` argument.
      accum_steps: split the batch into this many microbatches and average their gradients
        (equal to the big-batch step for batch-mean losses) with one optimizer update.
      donate: donate the state's buffers (updated in place).
      mesh: run under this mesh: the batch is sharded over ``batch_axes`` (a batch not divisible by
        their size raises ``ValueError``) and the new state keeps the input state's shardings
        (use :func:`jaxopt_big.parallel.shard_params` to place it). Under ``Explicit`` mesh axes the
        FSDP-split parameters are all-gathered before the forward pass; tensor-parallel layers
        under ``Explicit`` axes need the model's own output shardings.
      compute_dtype: e.g. ``jnp.bfloat16``: forward and backward in that dtype, float32 master
        weights and optimizer state.
      batch_axes: mesh axes the batch's leading dimension is split over (those present in the mesh).

    Examples:
      >>> import optax, jax.numpy as jnp
      >>> loss_fn = lambda p, b: (((p["w"] - b) ** 2).sum(), {})
      >>> tx = optax.sgd(0.5)
      >>> step = make_step(loss_fn, tx)
      >>> state, metrics = step(TrainState.create({"w": jnp.zeros(2)}, tx), jnp.ones(2))
      >>> state.params["w"].tolist(), float(metrics["loss"])
      ([1.0, 1.0], 2.0)
    """
    accum_steps = _checks.integer("accum_steps", accum_steps, low=1)
    donate = _checks.flag("make_step.donate", donate)

    def step(state: TrainState, batch: Any):
        grads, metrics, stats = grads_and_metrics(loss_fn, state, batch, accum_steps=accum_steps,
                                                  compute_dtype=compute_dtype)
        return apply_gradients(tx, state, grads, stats), metrics

    donate_argnums = (0,) if donate else ()
    if mesh is not None and jax.sharding.AxisType.Explicit in mesh.axis_types:
        loss_fn = _gathering(loss_fn, fsdp_axis="fsdp")
    if mesh is None:
        return jax.jit(step, donate_argnums=donate_argnums)

    _batch_sharding.batch_sharding(mesh, batch_axes)  # unknown axes fail here, not at the first step
    replicated = jax.sharding.NamedSharding(mesh, jax.P())
    compiled: dict[Any, Any] = {}

    def sharding_of(x):
        s = getattr(x, "sharding", None)
        return s if isinstance(s, jax.sharding.NamedSharding) and s.mesh == mesh else replicated

    def mesh_step(state: TrainState, batch: Any):
        batch = _batch_sharding.shard_batch(batch, mesh, batch_axes)
        state_sh = jax.tree.map(sharding_of, state)
        key = jax.tree.structure(state_sh), tuple(jax.tree.leaves(state_sh))
        if key not in compiled:
            batch_sh = jax.tree.map(lambda x: x.sharding, batch)
            compiled[key] = jax.jit(step, donate_argnums=donate_argnums, in_shardings=(state_sh, batch_sh),
                                    out_shardings=(state_sh, replicated))
        with jax.set_mesh(mesh):
            return compiled[key](state, batch)
    return mesh_step
