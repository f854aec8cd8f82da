"""Automatic mixed precision measured by the engine: ``auto(model, params, batches, jb.recipe.Auto(bits=4.25))``."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxopt_big import intercept as _intercept
from jaxopt_big import leaves as _leaves
from jaxopt_big import quant as _quant
from jaxopt_big import recipe as _recipe
from jaxopt_big import tree as _tree
from jaxopt_big.oneshot import _engine, _model

__all__ = ["auto"]

Loss = Callable[[Any, Any], jax.Array]


def auto(model_or_apply: Any, params: Any, calibration_batches: Iterable[Any], options: _recipe.Auto, *,
         loss: Loss | None = None, measured: bool = False, blocks: str | None = None, mesh: Any = None,
         progress: bool = True,
         row_mask: Callable[[Any], jax.typing.ArrayLike] | None = None, sequential: bool = False,
         data_axis: str = "data") -> tuple[_recipe.Recipe, _recipe.Sensitivity]:
    """Estimates each layer's effect on the loss at every bit width of ``options``, then picks bits per layer.

    The quantized weights are the engine's own: one :func:`compress` run per choice and fold with every
    block linear at that width (``options.uniform(bits)``), on the batches of the other folds (batch ``i``
    is in fold ``i % options.folds``), so with the defaults (choices 2, 3, 4, 5, 6, 8 and 2 folds) 12 runs
    of 2 block passes each, on half the batches each. A layer's cost at a width is summed over the folds,
    each measured on the fold's own batches with the kernels fitted on the others (a kernel is never
    scored on the data it was fitted to). The cost is the second-order estimate of the loss
    increase its quantized kernel ``W_b`` makes alone:
    ``sum(g * dy) + sum(g**2 * dy**2) / 2`` over the calibration batches, tokens and output features,
    where ``y`` is the layer's output in the float model, ``g = dL/dy`` the gradient of ``loss`` (one
    backward pass of the float model per batch) and ``dy = x (W_b - W)`` the change of the output on the
    layer's float inputs ``x``; summed over a stacked kernel's layers. The squared gradient stands for
    the curvature (the diagonal empirical Fisher, as HAWQ-v2 and ModelOpt's AutoQuantize score layers);
    the first-order term matters as much: a trained model is not at a minimum of its calibration loss
    (weight decay), and rounding and clipping move weights along its gradient. Costs are taken to add up
    across layers (the knapsack's assumption). A layer's bytes at each width are those its quantized
    leaf stores (codes and scales, :func:`jaxopt_big.quant.layer_bytes`). Then
    :func:`jaxopt_big.recipe.auto` allocates, checking each allocation chosen on all folds but one (for
    each lowest width) against every layer at the widest uniform width within the budget, both run in
    the whole model on the held-out fold's batches (``loss``'s increase over the float model; without
    ``loss``, the KL divergence of the float model's predictions to the quantized one's), which also
    catches layers whose errors do not add up: the recipe is the one that beat uniform by the most,
    or that uniform width when none did. With fewer batches than folds, or ``options.folds=1``: one
    run per width on all batches, costs in-sample, the allocation on them unchecked.

    The backward passes and the checks run the whole model at once (not block by block), with its
    parameters and one batch's activations and their gradients in memory; the returned sensitivity
    keeps every fold's quantized kernels at every width, to check again at another budget.

    Args:
      model_or_apply, params, calibration_batches, blocks, mesh, progress, row_mask, sequential,
        data_axis: as for :func:`compress` (``mesh`` places the engine's runs only).
      options: the budget and the choices (:class:`jaxopt_big.recipe.Auto`).
      loss: ``loss(outputs, batch) -> scalar`` of the model's outputs on one calibration batch (as
        given), summed (not averaged) over its tokens or examples, as the Fisher term assumes; for a
        language model the summed next-token loss. Default (``measured=False``): the cross-entropy of the outputs
        (their first array, read as logits over the last axis) against the float model's own most
        likely class, which needs no labels; weighted by ``row_mask(batch)`` when given. With
        ``measured=True``, default: the KL divergence of the float model's predictions (its outputs read
        as logits over the last axis) to the quantized one's, likewise weighted.
      measured: measure each cost instead of estimating it: the loss with that one kernel at that width
        (every other layer float) minus the float loss, summed over the calibration batches. Exact where
        the estimate's Taylor expansion is not (large steps, at 2 or 3 bits), and it makes no use of
        gradients, but it costs one forward pass of the whole model over the calibration batches per
        kernel and width (7 x 6 per decoder layer with the default choices) instead of one forward and
        backward pass in all.

    Returns:
      ``(recipe, sensitivity)``: one exact rule per kernel, to pass to :func:`compress`; and the
      estimates (per fold, with the held-out check), to allocate again at another budget without
      measuring (``jb.recipe.auto(sensitivity, jb.recipe.Auto(bits=...))``).

    Raises:
      ValueError: ``options.bits`` outside what the choices reach on the model's layers (after the
        first run, which finds the layers); a compressed layer the model never calls as a layer;
        and whatever :func:`compress` raises.

    Examples:
      >>> import flax.linen as nn, jax, jaxopt_big as jb
      >>> class Block(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         return x + nn.Dense(128, name="dense")(x)
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         return Block(name="layer_1")(Block(name="layer_0")(x))
      >>> x = jax.random.normal(jax.random.key(0), (64, 128))
      >>> params = Net().init(jax.random.key(1), x)["params"]
      >>> rtn = jb.RTN(jb.quant.QuantSpec(bits=4, granularity=jb.quant.Group(128)))  # default: GPTQ, MSE grid
      >>> options = jb.recipe.Auto(bits=6.25, choices=(4, 8), quantizer=rtn)
      >>> recipe, s = auto(Net(), params, [x], options, progress=False)
      >>> sorted(r.value.describe() for r in recipe.rules[1:]), s.average_bits({p: 4 for p in s.weights})
      (['rtn int4 g128', 'rtn int8 g128'], 4.25)
    """
    if not isinstance(options, _recipe.Auto):
        raise TypeError(f"auto needs jb.recipe.Auto options, got {type(options).__name__}")
    if loss is not None and not callable(loss):
        raise TypeError(f"auto: loss must be a function loss(outputs, batch) -> scalar, got {loss!r}")
    batches = list(calibration_batches)
    folds = options.folds if len(batches) >= options.folds else 1
    held = [[i for i in range(len(batches)) if i % folds == f] for f in range(folds)]  # fold f's own batches
    model = _model.wrap(model_or_apply, params)
    flat = model.flat()
    quantized: list[dict[int, dict[str, Any]]] = [{} for _ in range(folds)]  # per fold: fitted on the others
    sizes: dict[str, dict[int, int]] = {}
    kernels: dict[str, Any] = {}
    for fold, by_bits in enumerate(quantized):
        fit = [b for i, b in enumerate(batches) if folds == 1 or i % folds != fold]
        for bits in options.choices:
            out, report = _engine.compress(model_or_apply, params, fit, options.uniform(bits), blocks=blocks,
                                           mesh=mesh, progress=progress, row_mask=row_mask, sequential=sequential,
                                           data_axis=data_axis)
            done = _model.wrap(model_or_apply, out).flat()
            layers = [_kernel_path(row.path, flat) for row in report.rows]  # a stacked kernel: one row per layer
            by_bits[bits] = {p: done[p] for p in layers}
            if not sizes:  # the first run found the layers: a budget they cannot meet fails now, not after all runs
                kernels = _leaves.densify({p: flat[p] for p in by_bits[bits]})
                sizes = {p: _layer_bytes(x, layers.count(p), options) for p, x in kernels.items()}
                _recipe.Sensitivity({p: dict.fromkeys(options.choices, 0.0) for p in sizes}, sizes,
                                    _weights(kernels)).budget(options.bits)
    # the costs run the whole float model: lazy parameters (a streamed checkpoint) are read for them
    whole = _model.wrap(model_or_apply, _model.read_lazy(params))
    increase = _increase(whole, batches, loss, row_mask)
    costs = [_measured_costs(whole, q, increase, own) if measured
             else _taylor_costs(whole, [batches[i] for i in own], q, loss or _own_class_loss(row_mask))
             for q, own in zip(quantized, held)]

    def held_out(fold: int, allocation: Mapping[str, int]) -> float:
        new = {p: _leaves.densify(quantized[fold][b][p]) for p, b in allocation.items()}
        return increase(_replaced(whole.params, new), held[fold])

    total = {p: {b: sum(c[p][b] for c in costs) for b in by_bits} for p, by_bits in costs[0].items()}
    sensitivity = _recipe.Sensitivity(total, sizes, _weights(kernels), tuple(costs) if folds > 1 else (),
                                      held_out if folds > 1 else None)
    return _recipe.auto(sensitivity, options), sensitivity


def _own_class_loss(row_mask: Callable[[Any], jax.typing.ArrayLike] | None) -> Loss:
    """Cross-entropy against the most likely class: ``-max(log_softmax(z))``, whose gradient is ``p - onehot``."""
    def loss(outputs: Any, batch: Any) -> jax.Array:
        logits = jax.tree.leaves(outputs)[0].astype(jnp.float32)
        nll = -jnp.max(jax.nn.log_softmax(logits, axis=-1), axis=-1)
        return jnp.sum(nll if row_mask is None else nll * jnp.asarray(row_mask(batch), jnp.float32))
    return loss


def _taylor_costs(model: _model.Model, batches: list[Any], quantized: dict[int, dict[str, Any]],
                  loss: Loss) -> dict[str, dict[int, float]]:
    """``{kernel path: {bits: sum over batches of sum(g * dy + g**2 * dy**2 / 2)}}`` on the float model, with
    ``g = dL/dy`` and ``dy = x (W_b - W)``."""
    targets = set(next(iter(quantized.values())))
    where = lambda path, module: f"{path}/kernel" in targets  # noqa: E731
    forward = _forward(model)

    def run(params, impl, args, kwargs):
        with jax.disable_jit():  # a scanned stack loops in Python: one intercepted call per layer (as capture)
            return _intercept.replace(forward(params), where, _keyed(impl))(*args, **kwargs)

    def perturbed(params, eps, args, kwargs):  # each layer's output plus its own zero: d loss / d eps = d loss / dy
        return run(params, lambda key, call: call.run() + eps[key], args, kwargs)

    @jax.jit
    def gradients(params, eps, args, kwargs, d_outputs):  # the backward pass from d loss / d outputs
        return jax.vjp(lambda e: perturbed(params, e, args, kwargs), eps)[1](d_outputs)[0]

    @jax.jit
    def costs(params, grads, quantized, args, kwargs):
        out: dict[str, dict[int, jax.Array]] = {}

        def impl(key, call):
            path, index = f"{call.path}/kernel", int(key.partition("@")[2] or 0)
            g = grads[key].astype(jnp.float32)
            for bits, layers in quantized.items():
                new = _leaves.densify(layers[path])
                new = new[index] if new.ndim > call.kernel.ndim else new  # one layer of a stacked kernel
                zeroed = {k: new - call.kernel if k == "kernel" else jnp.zeros_like(v) for k, v in call.params.items()}
                dy = call.run(params=zeroed).astype(jnp.float32)  # x (W_b - W): the layer on the change, no bias
                total = out.setdefault(path, {})
                total[bits] = total.get(bits, 0.0) + jnp.sum(g * dy + jnp.square(g * dy) / 2)
            return call.run()
        run(params, impl, args, kwargs)
        return out

    params = model.params
    shapes: dict[str, jax.ShapeDtypeStruct] = {}
    args0, kwargs0 = _engine._as_call(batches[0])
    jax.eval_shape(lambda: run(params, lambda key, call: shapes.setdefault(key, call.run()), args0, kwargs0))
    eps = {k: jnp.zeros(v.shape, v.dtype) for k, v in shapes.items()}
    outputs = jax.jit(perturbed)
    totals: dict[str, dict[int, float]] = {}
    for batch in batches:
        args, kwargs = _engine._as_call(batch)
        d_outputs = jax.grad(loss)(outputs(params, eps, args, kwargs), batch)
        grads = gradients(params, eps, args, kwargs, d_outputs)
        for path, by_bits in jax.device_get(costs(params, grads, quantized, args, kwargs)).items():
            layer = totals.setdefault(path, {})
            for bits, value in by_bits.items():
                layer[bits] = layer.get(bits, 0.0) + float(value)
    missing = sorted(targets - set(totals))
    if missing:
        raise ValueError(f"auto: compressed layers {missing} are never called as layers by the model, so their "
                         "effect on the loss cannot be estimated")
    return totals


def _increase(model: _model.Model, batches: list[Any], loss: Loss | None,
              row_mask: Callable[[Any], jax.typing.ArrayLike] | None) -> Callable[[Any, list[int]], float]:
    """``(params, indices) -> sum over those batches of loss(params) - loss(float)``; without ``loss``, the KL
    divergence of the float model's predictions to those of ``params``."""
    run = jax.jit(lambda params, args, kwargs: model.call(params, args, kwargs))
    calls = [_engine._as_call(b) for b in batches]
    floats: dict[int, Any] = {}

    def cost(out: Any, ref: Any, batch: Any) -> float:
        if loss is not None:
            return float(loss(out, batch) - loss(ref, batch))
        logp, logq = (jax.nn.log_softmax(jax.tree.leaves(o)[0].astype(jnp.float32), axis=-1) for o in (ref, out))
        kl = jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)
        return float(jnp.sum(kl if row_mask is None else kl * jnp.asarray(row_mask(batch), jnp.float32)))

    def increase(params: Any, indices: list[int]) -> float:
        for i in indices:
            if i not in floats:
                floats[i] = run(model.params, *calls[i])
        return sum(cost(run(params, *calls[i]), floats[i], batches[i]) for i in indices)
    return increase


def _replaced(params: Any, new: Mapping[str, Any]) -> Any:
    """``params`` with the leaves at the paths of ``new`` replaced."""
    paths = _tree.paths(params)
    flat = dict(zip(paths, jax.tree.leaves(params)), **new)
    return jax.tree.unflatten(jax.tree.structure(params), [flat[p] for p in paths])


def _measured_costs(model: _model.Model, quantized: dict[int, dict[str, Any]],
                    increase: Callable[[Any, list[int]], float], indices: list[int]) -> dict[str, dict[int, float]]:
    """``{kernel path: {bits: increase}}`` over the batches at ``indices``, one kernel quantized at a time."""
    totals: dict[str, dict[int, float]] = {}
    for bits, layers in quantized.items():
        for path, leaf in layers.items():
            totals.setdefault(path, {})[bits] = increase(_replaced(model.params, {path: _leaves.densify(leaf)}),
                                                         indices)
    return totals


def _keyed(impl: Callable[[str, _intercept.Call], Any]) -> Callable[[_intercept.Call], Any]:
    """``impl(key, call)`` with each call's key as :func:`jaxopt_big.intercept.capture` names it: ``path``,
    then ``path@1``, ``path@2``... (the layers of a scanned stack, in order)."""
    seen: dict[str, int] = {}

    def keyed(call: _intercept.Call) -> Any:
        i = seen[call.path] = seen.get(call.path, -1) + 1
        return impl(call.path if i == 0 else f"{call.path}@{i}", call)
    return keyed


def _forward(model: _model.Model) -> Callable[[Any], Any]:
    """``params -> f(*args, **kwargs)``: the whole model, in a form :mod:`jaxopt_big.intercept` can wrap
    (an nnx module, or a function calling a linen apply)."""
    if isinstance(model, _model._Nnx):
        return lambda params: nnx.merge(model.graphdef, params, model.others)
    assert isinstance(model, _model._Linen)
    return lambda params: lambda *a, **k: model.apply({"params": params, **(model.extra or {})}, *a, **k)


def _layer_bytes(kernel: Any, layers: int, options: _recipe.Auto) -> dict[int, int]:
    """Bytes of a kernel at each choice; a stacked one is stored as its layers, each quantized alone."""
    one = kernel[0] if layers > 1 else kernel
    return {b: layers * n for b, n in _quant.layer_bytes({"k": one}, bits=options.choices, spec=options.spec,
                                                          where=lambda p, x: True)["k"].items()}


def _weights(kernels: dict[str, Any]) -> dict[str, int]:
    return {p: int(x.size) for p, x in kernels.items()}


def _kernel_path(label: str, flat: dict[str, Any]) -> str:
    """The kernel leaf of a report row: ``layers[3]/mlp/up`` (a stacked layer) -> ``layers/mlp/up/kernel``."""
    path = re.sub(r"\[\d+\]", "", label) + "/kernel"
    if path not in flat:
        raise ValueError(f"{label}: no kernel leaf {path!r} in the parameters")  # a report row names its kernel
    return path
