"""Calibration for one-shot compression: per-layer input statistics, gathered layer by layer.

:func:`sequential` walks a Flax model's Dense layers in call order. For each layer it runs every
calibration batch through the model *as compressed so far* (captured with
:func:`jaxopt_big.intercept.capture`), accumulates the layer's input Hessian ``X^T X`` and hands it to
a ``compress`` callback, whose result replaces the kernel before the next layer is calibrated. So
later layers see, and can correct for, the error of the already-compressed earlier ones (the
sequential mode of SparseGPT and GPTQ). Wanda's activation norms are ``sqrt(diag(X^T X))``.

:func:`sequential` re-runs the whole model once per layer, so its cost grows with the square of the
depth: it is the small-model reference. Deep models go through :func:`jaxopt_big.oneshot.compress`,
which runs each block alone on its captured inputs (linear in depth, one compile per block shape)
and calls the same per-layer solvers and :func:`inverse_hessian`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jaxopt_big import _checks
from jaxopt_big import intercept as _intercept
from jaxopt_big import leaves as _leaves
from jaxopt_big import tree as _tree

__all__ = ["LayerStats", "sequential", "layer_order", "inverse_hessian", "map_kernels"]


@flax.struct.dataclass
class LayerStats:
    """Input statistics of one Dense layer over the calibration rows.

    Attributes:
      hessian: ``X^T X`` summed over every (unmasked) input row, ``(d_in, d_in)``, float32.
      count: number of rows summed.
    """

    hessian: jax.Array
    count: jax.Array

    @property
    def norms(self) -> jax.Array:
        """Per-input-feature L2 norm over all rows, ``||X_j||_2`` (Wanda's activation norms)."""
        return jnp.sqrt(jnp.maximum(jnp.diagonal(self.hessian), 0.0))


def _args(batch: Any) -> tuple:
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def layer_order(apply_fn: Callable, variables: Any, batch: Any, *,
                where: str | Sequence[str] | None = None) -> list[str]:
    """Module paths of the selected Dense layers in the order the model calls them (no compute).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> model = nn.Sequential([nn.Dense(3), nn.relu, nn.Dense(2)])
      >>> variables = model.init(jax.random.key(0), jnp.ones((1, 4)))
      >>> layer_order(model.apply, variables, jnp.ones((1, 4)))
      ['layers_0', 'layers_2']
    """
    pick = None if where is None else _tree.Patterns(where, what="where")  # a bad pattern fails before the run
    called = []

    def record(path: str, module: Any) -> bool:  # the selector sees calls in order; result dicts are sorted
        if isinstance(module, nn.Dense):
            called.append(path)
        return False

    jax.eval_shape(_intercept.capture(apply_fn, record), variables, *_args(batch))
    dense = list(dict.fromkeys(called))
    paths = dense if pick is None else [p for p in dense if pick(p)]
    if pick is not None:
        pick.check()
    if not paths:
        raise ValueError(f"where={where!r} selects no Dense layer of the model")
    return paths


@functools.partial(jax.jit, static_argnames=("apply_fn", "path"))
def _batch_stats(apply_fn, path, variables, args, row_mask):
    _, records = _intercept.capture(apply_fn, lambda p, module: p == path and isinstance(module, nn.Dense))(
        variables, *args)
    hessian, count = 0.0, 0.0
    for record in records.values():  # several entries when the layer is called more than once
        x = record.inputs.reshape(-1, record.inputs.shape[-1]).astype(jnp.float32)
        w = jnp.ones(x.shape[0]) if row_mask is None else jnp.broadcast_to(
            row_mask, record.inputs.shape[:-1]).reshape(-1).astype(jnp.float32)
        hessian = hessian + (x * w[:, None]).T @ x
        count = count + w.sum()
    return hessian, count


def _get(params: dict, path: str) -> dict:
    node = params
    for part in path.split("/"):
        node = node[part]
    return node


def _set_kernel(params: dict, path: str, kernel: Any) -> dict:
    head, *rest = path.split("/")
    if not rest:
        return {**params, head: {**params[head], "kernel": kernel}}
    return {**params, head: _set_kernel(params[head], "/".join(rest), kernel)}


def sequential(apply_fn: Callable, variables: dict[str, Any], batches: Iterable[Any],
               compress: Callable[[str, jax.Array, LayerStats], Any] | None = None, *,
               where: str | Sequence[str] | None = None,
               row_mask: Callable[[Any], jax.Array] | None = None) -> tuple[dict[str, Any], dict[str, LayerStats]]:
    """Calibrates (and optionally compresses) the Dense layers of a linen model one at a time.

    Args:
      apply_fn: the linen apply function, called as ``apply_fn(variables, *batch)``.
      variables: the model variables, with the kernels under ``variables["params"][<module path>]``.
      batches: calibration batches; each is the tuple of positional arguments after ``variables``
        (or one array). Materialised once.
      compress: ``compress(path, kernel, stats) -> new kernel`` (a dense array or a compressed leaf,
        e.g. a ``QArray``), applied in call order; later layers are calibrated on the model with the
        earlier layers replaced. None only gathers statistics of the unchanged model.
      where: pattern(s) on module paths (:mod:`jaxopt_big.tree` semantics: full match on the layer's
        path or a module path above it) restricting which Dense layers are visited; None visits
        every ``nn.Dense``.
      row_mask: ``row_mask(batch) -> array`` broadcastable to a layer input's leading dims, 1 for
        rows that count (e.g. the attention mask, so padding does not enter the Hessians).

    Returns:
      ``(variables, stats)``: the variables with compressed kernels, and ``{module path: LayerStats}``
      in call order, each gathered on the model as compressed up to that layer.

    Raises:
      ValueError: no batches, or ``where`` selects no Dense layer.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> model = nn.Sequential([nn.Dense(3), nn.relu, nn.Dense(2)])
      >>> x = jax.random.normal(jax.random.key(1), (8, 4))
      >>> variables = model.init(jax.random.key(0), x)
      >>> halve = lambda path, kernel, stats: kernel / 2
      >>> new, stats = sequential(model.apply, variables, [x], halve)
      >>> list(stats), stats["layers_0"].hessian.shape, float(stats["layers_0"].count)
      (['layers_0', 'layers_2'], (4, 4), 8.0)
      >>> bool(jnp.allclose(stats["layers_0"].hessian, x.T @ x, atol=1e-5))
      True
    """
    batches = [_args(b) for b in batches]
    if not batches:
        raise ValueError("sequential calibration needs at least one batch")
    if not isinstance(variables, dict) or "params" not in variables:
        raise TypeError(f"variables must be a dict with a 'params' collection, got {type(variables).__name__}")
    masks = [None if row_mask is None else jnp.asarray(row_mask(b if len(b) > 1 else b[0])) for b in batches]
    order = layer_order(apply_fn, variables, batches[0], where=where)
    result, working = variables, _leaves.densify(variables)  # dense copy: shapes and compiles stay fixed
    stats: dict[str, LayerStats] = {}
    for path in order:
        hessian, count = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
        for args, mask in zip(batches, masks):
            h, c = _batch_stats(apply_fn, path, working, args, mask)
            hessian, count = hessian + h, count + c
        stats[path] = LayerStats(hessian=hessian, count=count)
        if compress is None:
            continue
        kernel = _get(result["params"], path)["kernel"]
        new = compress(path, kernel, stats[path])
        if tuple(new.shape) != tuple(kernel.shape):
            raise ValueError(f"{path}/kernel: compress returned shape {tuple(new.shape)}, "
                             f"expected {tuple(kernel.shape)}")
        result = {**result, "params": _set_kernel(result["params"], path, new)}
        dense = new.dense() if _leaves.is_compressed(new) else jnp.asarray(new)
        working = {**working, "params": _set_kernel(working["params"], path, dense.astype(kernel.dtype))}
    return result, stats


def inverse_hessian(hessian: jax.typing.ArrayLike, *, damp: float = 0.01) -> tuple[jax.Array, jax.Array]:
    """Upper Cholesky factor ``U`` of the damped inverse Hessian (``U^T U = (H + λI)^-1``), and dead inputs.

    The shared first step of SparseGPT and GPTQ: inputs that never fire (zero diagonal) get a unit
    diagonal so ``H`` stays invertible (their weights are zeroed by the caller); ``λ`` is ``damp``
    times the mean diagonal.

    Returns:
      ``(U, dead)``: ``U`` is ``(d, d)`` upper triangular float32; ``dead`` is a ``(d,)`` bool mask.

    Examples:
      >>> u, dead = inverse_hessian(jnp.array([[4.0, 0.0], [0.0, 0.0]]), damp=0.0)
      >>> u.tolist(), dead.tolist()
      ([[0.5, 0.0], [0.0, 1.0]], [False, True])
    """
    h = jnp.asarray(hessian, jnp.float32)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"hessian must be square 2-d, got shape {h.shape}")
    damp = _checks.number("damp", damp, low=0)
    diag = jnp.diagonal(h)
    dead = diag == 0
    h = h + jnp.diag(jnp.where(dead, 1.0, 0.0) + damp * jnp.mean(jnp.where(dead, 1.0, diag)))
    # H = R R^T with R = J L J upper triangular (L: the Cholesky factor of H with its inputs reversed
    # by J), so H^-1 = R^-T R^-1 and U = R^-1 = J L^-1 J: one factorization and one triangular solve
    # (2.5x fewer flops than inverting H and factoring the inverse), and no reversed copy of L: the
    # one reversal is the last copy, so at most two (d, d) buffers are live at once
    lower = jnp.linalg.cholesky(h[::-1, ::-1])
    # the identity times sign(L[0, 0]) (1, or NaN where the factorization failed) depends on L, so
    # that XLA makes it after the factorization instead of holding it through it as a third buffer
    eye = jnp.eye(h.shape[0], dtype=h.dtype) * jnp.sign(lower[0, 0])
    inverse = jax.scipy.linalg.solve_triangular(lower, eye, lower=True)
    return jnp.triu(inverse[::-1, ::-1]), dead


def map_kernels(fn: Callable[..., Any], params: Any, per_layer: Mapping[str, Any], option: Any = None, *,
                what: str = "option") -> Any:
    """Replaces the kernel of every module path in ``per_layer`` by ``fn(kernel_path, kernel, value)``.

    Kernels are looked up at ``<module path>/kernel`` in ``params`` (a linen ``params`` collection)
    or at ``params/<module path>/kernel`` (full variables). With ``option`` (a value or
    ``[jb.tree.Rule(regex, value), ...]`` assigned among those kernels as in :mod:`jaxopt_big.tree`),
    ``fn`` also gets the kernel's value, ``fn(kernel_path, kernel, stat, value)``; kernels no rule
    claims (or claimed with ``None``) stay as they are.

    Raises:
      ValueError: ``per_layer`` is empty, a module path has no kernel (the message lists them), or a
        rule claims no kernel.

    Examples:
      >>> params = {"Dense_0": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
      >>> map_kernels(lambda p, k, v: k * v, params, {"Dense_0": 3.0})["Dense_0"]["kernel"].tolist()
      [[3.0, 3.0], [3.0, 3.0]]
    """
    if not per_layer:
        raise ValueError("no per-layer statistics given")
    kernels = {p for p in _tree.paths(params) if p.endswith("/kernel")}
    targets = {}
    for module in per_layer:
        found = [k for k in (f"{module}/kernel", f"params/{module}/kernel") if k in kernels]
        if not found:
            raise ValueError(f"{module}: no kernel at '{module}/kernel' in the parameters; kernels: {sorted(kernels)}")
        targets[found[0]] = module
    if option is None:
        return _tree.map_with_path(lambda p, x: fn(p, x, per_layer[targets[p]]) if p in targets else x, params)
    return _tree.map_assigned(lambda p, x, v: fn(p, x, per_layer[targets[p]], v), params, option,
                              where=lambda p, x: p in targets, what=what)
