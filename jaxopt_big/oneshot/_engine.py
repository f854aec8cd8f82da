"""The block-wise one-shot engine: ``compress(model, params, batches, recipe)``.

For each block (a repeated submodule, or one layer of a scanned stack), in order:

1. its inputs for every calibration batch are already on hand (the first block's are captured once,
   running only what precedes it; each later block's are the previous block's outputs);
2. the block runs alone on them, jitted once per block shape (its parameters are arguments, never
   static), and accumulates ``X^T X`` of the inputs of every targeted linear; layers that read the
   same input (q/k/v, gate/up) share one Hessian; Wanda's norms are ``sqrt(diag(X^T X))``;
3. each targeted layer's plan runs on its 2-d view (:mod:`._solve`), in the order the block calls
   the layers;
4. the block runs again with the compressed weights: its outputs are the next block's inputs.

By default the Hessians of all layers of a block come from one run of the block on its (already
compressed-upstream) inputs, as the GPTQ and SparseGPT reference scripts do by default: two block
runs per block in all. ``sequential=True`` recomputes them group by group (q/k/v, then the output
projection, then gate/up, then down), each after compressing the groups before it (the references'
``--true-sequential``): one more block run per group.

Linears outside the blocks (an input projection, an LM or classifier head) are not targets, as in the
GPTQ/SparseGPT references: they stay as given, and a rule that names only them raises. Round them to
nearest with ``recipe.apply`` or ``jb.quant.quantize_params`` if wanted.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxopt_big import intercept as _intercept
from jaxopt_big import leaves as _leaves
from jaxopt_big import recipe as _recipe
from jaxopt_big import tree as _tree
from jaxopt_big.oneshot import _linear, _model, _solve

__all__ = ["compress", "Report", "LayerRow"]


@dataclasses.dataclass(frozen=True)
class LayerRow:
    """One compressed layer (one layer of a stack): its method and relative output error."""

    path: str
    method: str
    shape: tuple[int, int]
    sparsity: float
    bits: int | None
    error: float


@dataclasses.dataclass(frozen=True)
class Report:
    """What :func:`compress` did, per layer, in call order.

    Attributes:
      rows: one :class:`LayerRow` per compressed layer; ``error`` is ``||X W' - X W||^2 / ||X W||^2``
        on the layer's calibration inputs (as they were when it was compressed).
      blocks: number of blocks.
      block_passes: block runs over the whole calibration set, per block (2 by default: statistics,
        then outputs); the embeddings run once more, up to the first block only.
      seconds: wall time.
    """

    rows: tuple[LayerRow, ...]
    blocks: int
    block_passes: float
    seconds: float

    def as_dicts(self) -> list[dict[str, Any]]:
        """The rows as plain dicts (for JSON)."""
        return [dataclasses.asdict(r) for r in self.rows]

    def _cells(self) -> list[tuple[str, ...]]:
        head = ("layer", "method", "shape", "sparsity", "bits", "rel. error")
        body = [(r.path, r.method, f"{r.shape[0]}x{r.shape[1]}", f"{r.sparsity:.3f}",
                 "-" if r.bits is None else str(r.bits), f"{r.error:.3g}") for r in self.rows]
        return [head, *body]

    def __str__(self) -> str:
        cells = self._cells()
        widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(f"{len(self.rows)} layers in {self.blocks} blocks; {self.block_passes:g} block passes over "
                     f"the calibration set; {self.seconds:.1f} s")
        return "\n".join(lines)

    def to_markdown(self) -> str:
        """The table as markdown."""
        cells = self._cells()
        lines = ["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(cells[0])]
        lines += ["| " + " | ".join(c) + " |" for c in cells[1:]]
        return "\n".join(lines)


# ---------------------------------------------------------------- what a block calls, traced

def _is_target(path: str, module: Any) -> bool:
    return isinstance(module, _linear.TARGETS)


def _record(runner: Any, params: Any, rest: Any, args: tuple, kwargs: dict) -> tuple[Any, list]:
    """Runs a block, recording ``(path, module, inputs, kernel)`` of each targeted linear call in order."""
    calls = []

    def impl(call):
        calls.append((call.path, call.module, call.inputs, call.kernel))
        return NotImplemented
    out = _intercept.replace(runner.bind(params, rest), _is_target, impl)(*args, **kwargs)
    return out, calls


@dataclasses.dataclass(frozen=True)
class _Group:
    """Layers that read the same input(s): one shared Hessian."""

    paths: tuple[str, ...]
    views: tuple[_linear.View, ...]
    keys: tuple[int, ...]


def _groups(calls: list) -> tuple[list[_Group], list]:
    """Groups in call order, and the distinct inputs they read (``(inputs, view)`` per key)."""
    keys: dict[tuple, int] = {}
    inputs: list = []
    layer_keys: dict[str, list[int]] = {}
    views: dict[str, _linear.View] = {}
    for path, module, x, kernel in calls:
        view = views.setdefault(path, _linear.view_of(module, np.shape(kernel), path))
        key = (id(x), tuple(a % x.ndim for a in view.input_axes))
        if key not in keys:
            keys[key] = len(inputs)
            inputs.append((x, view))
        layer_keys.setdefault(path, []).append(keys[key])
    grouped: dict[tuple[int, ...], list[str]] = {}
    for path, ks in layer_keys.items():
        grouped.setdefault(tuple(ks), []).append(path)
    return [_Group(tuple(p), tuple(views[q] for q in p), k) for k, p in grouped.items()], inputs


def _layout(runner: Any, static: _model.Static, params: Any, rest: Any, arrays: list) -> list[_Group]:
    found = {}

    def trace(params, rest, arrays):
        args, kwargs = static.join(arrays)
        found["groups"] = _groups(_record(runner, params, rest, args, kwargs)[1])[0]
    jax.eval_shape(trace, params, rest, arrays)
    return found["groups"]


@functools.partial(jax.jit, static_argnames=("runner", "static", "stage"))
def _stage_hessians(runner, static, stage, params, rest, arrays, row_mask):
    """``[(X^T X, rows)]`` of the groups in ``stage``, on one batch."""
    args, kwargs = static.join(arrays)
    groups, inputs = _groups(_record(runner, params, rest, args, kwargs)[1])
    out = []
    for g in stage:
        h, n = 0.0, 0.0
        for k in groups[g].keys:
            x, view = inputs[k]
            rows, weights = view.rows(x, row_mask)
            h = h + (rows * weights[:, None]).T @ rows
            n = n + weights.sum()
        out.append((h, n))
    return out


@functools.partial(jax.jit, static_argnames=("runner", "static"))
def _block_forward(runner, static, params, rest, arrays):
    args, kwargs = static.join(arrays)
    return runner.bind(params, rest)(*args, **kwargs)


def _first(out: Any) -> jax.Array:
    return out[0] if isinstance(out, (tuple, list)) else out


# ---------------------------------------------------------------- inputs

def _as_call(batch: Any) -> tuple[tuple, dict]:
    if isinstance(batch, dict):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


def _overridden(base: Any, new: dict[str, jax.Array]) -> Any:
    """``base`` with the leaves named in ``new`` replaced."""
    return _tree.map_with_path(lambda p, x: new.get(p, x), base)


def _check_batches(batches: list[tuple[tuple, dict]]) -> None:
    if not batches:
        raise ValueError("compress needs at least one calibration batch")
    ref = batches[0]
    ref_leaves = jax.tree_util.tree_leaves_with_path(ref)
    for i, b in enumerate(batches[1:], 1):
        if jax.tree.structure(b) != jax.tree.structure(ref):  # type: ignore[operator]  # PyTreeDef alias unresolved
            raise ValueError(f"calibration batch {i} has structure {jax.tree.structure(b)}, batch 0 has "
                             f"{jax.tree.structure(ref)}")
        for (p, x), (_, r) in zip(jax.tree_util.tree_leaves_with_path(b), ref_leaves):
            if np.shape(x) != np.shape(r) or jnp.result_type(x) != jnp.result_type(r):
                raise ValueError(f"calibration batch {i}: argument {_tree.path_str(p)} has shape {np.shape(x)} "
                                 f"and dtype {jnp.result_type(x)}, batch 0 has {np.shape(r)} {jnp.result_type(r)}")


def _place(batch: tuple[tuple, dict], mesh: Any, axis: str) -> tuple[tuple, dict]:
    if mesh is None:
        return jax.tree.map(jnp.asarray, batch)
    size = mesh.shape[axis]

    def put(path, x):
        x = jnp.asarray(x)
        if x.ndim == 0 or x.shape[0] % size:
            raise ValueError(f"calibration batch argument {_tree.path_str(path)}: leading axis of shape "
                             f"{x.shape} is not divisible by mesh axis {axis!r} of size {size}")
        return jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.P(axis)))
    return jax.tree_util.tree_map_with_path(put, batch)


def _replicated(x: jax.Array, mesh: Any) -> jax.Array:
    return x if mesh is None else jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.P()))


# ---------------------------------------------------------------- the engine

@dataclasses.dataclass
class _Piece:
    solved: _solve.Solved
    view: _linear.View
    plan: _recipe.Plan


def _plans(model: _model.Model, recipe: _recipe.Recipe, targets: set[str]) -> dict[str, _recipe.Plan]:
    chosen = dict(zip(model.flat(), jax.tree.leaves(_tree.select(model.params, recipe.where))))
    values = _tree.assign(model.params, list(recipe.rules), where=lambda p, x: p in targets and chosen.get(p, False),
                          what="recipe")
    return {p: v for p, v in zip(model.flat(), jax.tree.leaves(values, is_leaf=lambda v: v is None or isinstance(
        v, _recipe.Plan))) if isinstance(v, _recipe.Plan)}


def compress(model_or_apply: Any, params: Any, calibration_batches: Iterable[Any], recipe: _recipe.Recipe, *,
             blocks: str | None = None, mesh: Any = None, progress: bool = True,
             row_mask: Callable[[Any], jax.typing.ArrayLike] | None = None, sequential: bool = False,
             data_axis: str = "data") -> tuple[Any, Report]:
    """Compresses a linen or nnx model block by block with its recipe's one-shot methods.

    Args:
      model_or_apply: an nnx module, a linen module, or a linen apply function
        ``apply(variables, *batch)``.
      params: linen: the ``params`` collection (or full variables ``{"params": ..., ...}``, returned in
        the same form); nnx: an ``nnx.State`` of the parameters (or the module's whole state, returned
        whole with its other variables as given), or None for the module's own.
      calibration_batches: batches of model inputs, each a tuple of positional arguments, a dict of
        keyword arguments, or one array; all of the same shapes and dtypes.
      recipe: a :class:`jaxopt_big.Recipe`; its rules are matched against the kernels of the targeted
        linears (Dense/DenseGeneral/Einsum, nnx Linear/LinearGeneral/Einsum) inside the blocks; linears
        outside them (an LM head) stay as given. A stacked (scanned)
        kernel is one leaf: its rule applies to every layer of the stack, compressed layer by layer.
      blocks: regex (full match) of the block module paths, e.g. ``r"layer_\\d+"``; None finds the
        repeated numbered submodules, or the stacked submodule of a scanned model (``nnx.scan``, or
        the body of a linen ``nn.scan`` with ``variable_axes={"params": 0}``), or else takes the
        whole model as one block (an MLP, a small CNN: every layer's statistics from one pass).
      mesh: a mesh (``Auto`` axes, as ``jb.parallel.make_mesh`` makes by default) whose ``data_axis``
        splits every calibration batch's leading axis; Hessians are
        reduced across it by XLA, the per-layer solvers run replicated, and compressed leaves keep
        their parameter's sharding. Parameters may be sharded (e.g. FSDP) as given.
      progress: a tqdm bar over the blocks.
      row_mask: ``row_mask(batch) -> (batch, length)`` weights (1 = real token) so that padding
        stays out of the Hessians.
      sequential: recompute the Hessians of later layers in a block after compressing earlier ones
        (one block run per group of layers sharing an input) instead of one run per block.
      data_axis: the mesh axis that splits the batches.

    Returns:
      ``(compressed, report)``: the parameters with each targeted kernel replaced (a ``QArray`` where
      quantized; a dense array with zeros where only pruned — ``jb.sparsity.pack`` stores it packed),
      and a :class:`Report`. The caller's parameters are not modified.

    Raises:
      ValueError: a rule that claims no targeted layer; batches of differing shapes or dtypes, or
        that the model cannot run; NaN/inf in a layer's calibration inputs; a Hessian that is not
        positive definite after damping (each names the layer).

    Examples:
      >>> import flax.linen as nn, jax, jax.numpy as jnp, jaxopt_big as jb
      >>> from jaxopt_big.tree import Rule
      >>> class Block(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         return x + nn.Dense(8, name="down")(jax.nn.relu(nn.Dense(16, name="up")(x)))
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         for i in range(3):
      ...             x = Block(name=f"layer_{i}")(x)
      ...         return x
      >>> x = jax.random.normal(jax.random.key(0), (32, 8))
      >>> params = Net().init(jax.random.key(1), x)["params"]
      >>> recipe = jb.Recipe([Rule(r".*", jb.Plan(sparsity=jb.SparseGPT(0.5)))])
      >>> new, report = compress(Net(), params, [x[:16], x[16:]], recipe, progress=False)
      >>> float((new["layer_2"]["up"]["kernel"] == 0).mean()), report.blocks, report.block_passes
      (0.5, 3, 2.0)
    """
    start = time.perf_counter()
    if not isinstance(recipe, _recipe.Recipe):
        raise TypeError(f"compress needs a jb.Recipe, got {type(recipe).__name__}")
    shape = np.shape(calibration_batches) if isinstance(calibration_batches, (np.ndarray, jax.Array)) else None
    hint = "" if shape is None else (f" (calibration_batches is one array, read as {shape[0]} batches of shape "
                                     f"{shape[1:]}; pass [x] for one batch)")
    model = _model.wrap(model_or_apply, params)
    raw = [_as_call(b) for b in calibration_batches]
    _check_batches(raw)
    masks = [None if row_mask is None else jnp.asarray(row_mask(b)) for b in calibration_batches]
    batches = [_place(b, mesh, data_axis) for b in raw]
    block_list = model.blocks(blocks, _on_batch0(lambda: model.stacked(*batches[0]), hint))
    block_list = _model.in_call_order(block_list, _on_batch0(lambda: model.call_order(block_list, *batches[0]), hint))
    working = _leaves.densify(model.params)
    first = _on_batch0(lambda: model.capture(working, block_list[0], *batches[0]),
                       ("" if block_list[0].whole else f" up to {block_list[0].name}") + hint)
    static, first_arrays = _model.Static.split(*first)
    inputs = [first_arrays] + [_model.Static.split(*model.capture(working, block_list[0], *b))[1]
                               for b in batches[1:]]
    runners = model.runners(block_list, *batches[0])
    layouts = {}
    targets: set[str] = set()
    for block, (runner, rest) in zip(block_list, runners):
        if runner not in layouts:
            layouts[runner] = _layout(runner, static, model.block_params(working, block), rest, inputs[0])
        targets.update(block.param(f"{p}/kernel") for g in layouts[runner] for p in g.paths)
    plans = _plans(model, recipe, targets)

    pieces: dict[str, dict[int | None, _Piece]] = {}
    rows: list[LayerRow] = []
    runs = 0
    work = list(zip(block_list, runners))
    planned_blocks = [i for i, (b, (runner, _)) in enumerate(work)
                      if any(b.param(f"{p}/kernel") in plans for g in layouts[runner] for p in g.paths)]
    work = work[:max(planned_blocks, default=-1) + 1]  # blocks after the last planned one need no inputs
    for block, (runner, rest) in tqdm(work, desc="oneshot", unit="block", disable=not progress, leave=False):
        groups = layouts[runner]
        base = model.block_params(working, block)
        planned = [g for g, group in enumerate(groups)
                   if any(block.param(f"{p}/kernel") in plans for p in group.paths)]
        stages = [[g] for g in planned] if sequential else ([planned] if planned else [])
        new: dict[str, jax.Array] = {}
        for stage in stages:
            current = _overridden(base, new)
            stats = None
            for arrays, mask in zip(inputs, masks):
                got = _stage_hessians(runner, static, tuple(stage), current, rest, arrays, mask)
                stats = got if stats is None else jax.tree.map(jnp.add, stats, got)
            runs += 1
            assert stats is not None  # _check_batches: at least one batch
            for g, (hessian, _) in zip(stage, stats):
                group = groups[g]
                names = [block.label(p) for p in group.paths]
                if not bool(jnp.all(jnp.isfinite(hessian))):
                    raise ValueError(f"{', '.join(names)}: NaN or inf in the calibration inputs of these layers")
                hessian = _replicated(hessian, mesh)
                for rel, view, name in zip(group.paths, group.views, names):
                    plan = plans.get(block.param(f"{rel}/kernel"))
                    if plan is None:
                        continue
                    kernel = _model_kernel(base, rel)
                    solved = _solve.solve(name, _replicated(view.matrix(kernel), mesh), hessian, plan)
                    new[f"{rel}/kernel"] = view.unview(solved.matrix).astype(kernel.dtype)
                    pieces.setdefault(block.param(f"{rel}/kernel"), {})[block.index] = _Piece(solved, view, plan)
                    rows.append(_row(name, solved, view, plan))
        if not block.whole:  # the whole model feeds no next block
            current = _overridden(base, new)
            inputs = [_next_inputs(block, arrays, _block_forward(runner, static, current, rest, arrays))
                      for arrays in inputs]
            runs += 1
    compressed = _tree.map_with_path(lambda p, x: _assemble(p, x, pieces[p]) if p in pieces else x, model.params)
    compressed = model.result(compressed)
    report = Report(rows=tuple(rows), blocks=len(block_list), block_passes=runs / max(len(work), 1),
                    seconds=time.perf_counter() - start)
    return compressed, report


def _on_batch0(run: Callable[[], Any], where: str) -> Any:
    """``run()``; an error of the model on calibration batch 0 is bad input, reported as such."""
    try:
        return run()
    except Exception as e:
        raise ValueError(f"calibration batch 0 does not run through the model{where}: {type(e).__name__}: {e}") from e


def _model_kernel(block_params: Any, rel: str) -> jax.Array:
    node = block_params
    for part in rel.split("/"):
        node = node[part] if _model._has_key(node, part) else node[int(part)]
    return jnp.asarray(node["kernel"] if _model._has_key(node, "kernel") else node)


def _next_inputs(block: _model.Block, arrays: list, out: Any) -> list:
    x = _first(out)
    if np.shape(x) != np.shape(arrays[0]) or x.dtype != arrays[0].dtype:
        raise ValueError(f"{block.name}: block output {np.shape(x)} {x.dtype} cannot feed the next block, whose "
                         f"first argument is {np.shape(arrays[0])} {arrays[0].dtype}")
    return [x, *arrays[1:]]


def _row(name: str, solved: _solve.Solved, view: _linear.View, plan: _recipe.Plan) -> LayerRow:
    q = plan.quantizer
    bits = getattr(q.spec, "bits", None) if q is not None else None
    return LayerRow(path=name, method=plan.describe(), shape=(view.d_in, view.d_out),
                    sparsity=float(np.mean(np.asarray(solved.matrix) == 0)), bits=bits, error=solved.error)


def _assemble(path: str, leaf: Any, pieces: dict[int | None, _Piece]) -> Any:
    """The compressed leaf from its per-layer pieces (one, or one per layer of a stack)."""
    order = [None] if None in pieces else list(range(len(pieces)))
    ps = [pieces[i] for i in order]
    stack = (lambda xs: xs[0]) if order == [None] else (lambda xs: jnp.stack(xs))
    dense = stack([p.view.unview(p.solved.matrix) for p in ps])
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        dense = jax.device_put(dense, sharding)
    first = ps[0].solved
    if first.quant is not None:
        scale = stack([p.view.scale_layout(p.solved.quant.scale, path) for p in ps])
        zero = None if first.quant.zero_point is None else stack(
            [p.view.scale_layout(p.solved.quant.zero_point, path) for p in ps])
        quantizer = ps[0].plan.quantizer
        assert quantizer is not None  # a quantized piece was planned with a quantizer
        q = quantizer.spec.quantize(dense, scale, zero, path=path)
        return q.replace(dense_dtype=np.dtype(leaf.dtype))
    if first.fmt is not None:
        return first.fmt.quantize(dense.astype(leaf.dtype), path=path)
    return dense.astype(leaf.dtype)
