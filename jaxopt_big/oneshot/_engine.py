"""The block-wise one-shot engine: ``compress(model, params, batches, recipe)``.

A pipeline of named steps: prepare the batches and the blocks, with each block shape's layout
traced once (:func:`_prepare`), then for each block (a repeated submodule, or one layer of a
scanned stack), in order, calibrate (:func:`_calibrate`), solve (:func:`_solve_group`) and
propagate (:func:`_propagate`); finally assemble the compressed leaves (:func:`_assemble`):

1. its inputs for every calibration batch are already on hand (the first block's are captured once,
   running only what precedes it; each later block's are the previous block's outputs);
2. the block runs alone on them, jitted once per block shape (its parameters are arguments, never
   static), and accumulates ``X^T X`` of the inputs of every targeted linear; layers that read the
   same input (q/k/v, gate/up) share one Hessian; Wanda's norms are ``sqrt(diag(X^T X))``;
3. each targeted layer's plan runs on its 2-d view (:mod:`._solve`), in the order the block calls
   the layers; when a plan's method migrates scales (AWQ, SmoothQuant: ``Method.input_scales``), all
   of the block's scales come first, from the same run of the block on its float weights (plus
   ``max|x|`` and ``mean|x|`` per input channel; AWQ also scores its candidate scales on the output
   of the module each group feeds, running the float block with that group's kernels rounded at each
   candidate: :func:`_output_error`), and are folded before anything is solved: the
   group's kernels' rows times ``s``, and the output channels of the module that produces their input
   (a norm, or a linear before: found once per block shape by trying a random fold on calibration
   batch 0) divided by ``s``; the group then solves on ``diag(s) W`` with the Hessian of ``x / s``. A
   group without such a module gets its plan without the migration, reported as ``(no fold)``;
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

import contextlib
import contextvars
import dataclasses
import functools
import time
from typing import Any
from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxopt_big import intercept as _intercept
from jaxopt_big import leaves as _leaves
from jaxopt_big import quant as _quant
from jaxopt_big import recipe as _recipe
from jaxopt_big import report as _report
from jaxopt_big import tree as _tree
from jaxopt_big.oneshot import _linear, _model, _solve

__all__ = ["compress", "Report", "LayerRow"]


@dataclasses.dataclass(frozen=True)
class LayerRow:
    """One compressed layer (one layer of a stack): its method, relative output error ``error`` and
    output energy ``energy`` = ``||X W||^2`` on its calibration inputs (``error * energy`` adds up across layers)."""

    path: str
    method: str
    shape: tuple[int, int]
    sparsity: float
    bits: int | None
    error: float
    energy: float


@dataclasses.dataclass(frozen=True)
class Report:
    """What :func:`compress` did, per layer, in call order.

    Attributes:
      rows: one :class:`LayerRow` per compressed layer; ``error`` is ``||X W' - X W||^2 / ||X W||^2``
        on the layer's calibration inputs (as they were when it was compressed).
      blocks: number of blocks.
      block_passes: block runs over the whole calibration set, per block (2 by default: statistics,
        then outputs; AWQ's scale search adds one per candidate and one of the float block, per group
        it scores on a module's output); the embeddings run once more, up to the first block only.
      seconds: wall time.
      phases: seconds per step of the pipeline (``capture``, ``calibrate``, ``solve``, ``propagate``,
        ``assemble``; ``load`` where block parameters are read when their block is reached), each
        step waited for before the next starts; they add up to about ``seconds``.
    """

    rows: tuple[LayerRow, ...]
    blocks: int
    block_passes: float
    seconds: float
    phases: dict[str, float] = dataclasses.field(default_factory=dict)

    def as_dicts(self) -> list[dict[str, Any]]:
        """The rows as plain dicts (for JSON)."""
        return [dataclasses.asdict(r) for r in self.rows]

    def table(self) -> _report.Table:
        """The rows as a :class:`jaxopt_big.report.Table`, with a summary line under it."""
        body = tuple((r.path, r.method, f"{r.shape[0]}x{r.shape[1]}", f"{r.sparsity:.3f}",
                      "-" if r.bits is None else str(r.bits), f"{r.error:.3g}") for r in self.rows)
        note = (f"{len(self.rows)} layers in {self.blocks} blocks; {self.block_passes:g} block passes over "
                f"the calibration set; {self.seconds:.1f} s")
        return _report.Table(("layer", "method", "shape", "sparsity", "bits", "rel. error"), body,
                             right=(False, False, True, True, True, True), note=note)

    def __str__(self) -> str:
        return str(self.table())

    def to_markdown(self) -> str:
        """The table as markdown."""
        return self.table().to_markdown()


# ---------------------------------------------------------------- where the time goes

_CLOCK: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar("oneshot_clock", default=None)


@contextlib.contextmanager
def _phase(name: str):
    """Adds the wall time of the ``with`` body to phase ``name`` of the running :func:`compress`."""
    clock, start = _CLOCK.get(), time.perf_counter()
    try:
        yield
    finally:
        if clock is not None:
            clock[name] = clock.get(name, 0.0) + time.perf_counter() - start


def _timed(name: str) -> Callable[[Callable], Callable]:
    """A pipeline step whose time (its results waited for) counts in phase ``name``."""
    def wrap(step: Callable) -> Callable:
        @functools.wraps(step)
        def run(*args, **kwargs):
            with _phase(name):
                return jax.block_until_ready(step(*args, **kwargs))
        return run
    return wrap


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


@functools.partial(jax.jit, static_argnames=("runner", "static", "extra"))
def _block_run(runner, static, params, rest, arrays, row_mask, extra=()):
    """The block's output and, per group, ``([(rows, weights)], max|x|)`` on one batch: the rows of each
    input the group reads, and ``max|x|`` only for the groups in ``extra`` (None for the others). One
    program serves every statistics run of a block (any stage) and its output run, each using its
    part: one compile per block shape (and ``extra``), not one per stage plus one for the output."""
    args, kwargs = static.join(arrays)
    result, calls = _record(runner, params, rest, args, kwargs)
    groups, inputs = _groups(calls)
    out = []
    for g, group in enumerate(groups):
        xs, top = [], None
        for k in group.keys:
            x, view = inputs[k]
            rows, weights = view.rows(x, row_mask)
            xs.append((rows, weights))
            if g in extra:
                top = _maximum(top, jnp.max(jnp.where(weights[:, None] > 0, jnp.abs(rows), 0.0), axis=0))
        out.append((xs, top))
    return result, out


@functools.partial(jax.jit, static_argnames=("totals", "wide"))
def _sums(groups: list[list[tuple[jax.Array, jax.Array]]], totals: tuple[bool, ...],
          wide: bool = True) -> list[tuple[jax.Array, jax.Array, jax.Array | None]]:
    """Per group, ``(X^T X, rows, sum|x|)`` (the last only where ``totals``) of its weighted rows, summed
    in float64 and rounded to float32: one program for all groups of a stage (not one per input width).
    A float32 sum's bits depend on its order, which depends on how the rows are split over a mesh's
    data axis (each device sums its rows, then the devices' sums are added); GPTQ's error feedback
    turns such last-bit differences into different codes. Products of float32 values are exact in
    float64 and the sum's error is ~2^-29 of a float32 step, so every split gives the same float32
    Hessian, but for an entry within that distance of a rounding tie. With ``wide`` False (TPUs,
    which emulate float64 slowly) the sums stay float32 and their bits may depend on the split."""
    dtype = jnp.float64 if wide else jnp.float32

    def rounded(parts: list[jax.Array]) -> jax.Array:
        return functools.reduce(jnp.add, parts).astype(jnp.float32)

    def one(xs: list[tuple[jax.Array, jax.Array]], total: bool) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        cast = [(rows.astype(dtype), weights.astype(dtype)[:, None]) for rows, weights in xs]
        return (rounded([(r * w).T @ r for r, w in cast]), rounded([w.sum() for _, w in cast]),
                rounded([(jnp.abs(r) * w).sum(axis=0) for r, w in cast]) if total else None)
    return [one(xs, total) for xs, total in zip(groups, totals)]


def _stage_hessians(runner, static, stage, params, rest, arrays, row_mask, extra=()) -> list[tuple]:
    """``[(X^T X, rows, max|x|, sum|x|)]`` of the groups in ``stage``, on one batch; the two per-channel
    statistics only for the groups in ``extra`` (None for the others: no cost without migration). The
    block runs in float32 as given; only the sums are formed in float64 (:func:`_sums`)."""
    every = _block_run(runner, static, params, rest, arrays, row_mask, extra=extra)[1]
    rows = [every[g] for g in stage]
    exact = jax.default_backend() != "tpu"
    with jax.enable_x64(exact):
        sums = _sums([xs for xs, _ in rows], tuple(g in extra for g in stage), exact)
    return [(h, n, top, total) for (h, n, total), (_, top) in zip(sums, rows)]


def _maximum(a: jax.Array | None, b: jax.Array | None) -> jax.Array | None:
    return b if a is None else a if b is None else jnp.maximum(a, b)


def _accumulate(a: list[tuple], b: list[tuple]) -> list[tuple]:
    """Per-batch statistics of :func:`_stage_hessians` summed (``max|x|``: maximum) over batches."""
    return [(h1 + h2, n1 + n2, _maximum(t1, t2), None if s1 is None else s1 + s2)
            for (h1, n1, t1, s1), (h2, n2, t2, s2) in zip(a, b)]


def _probe(runner, static, params, rest, arrays):
    """The block's output leaves and each group's input rows (per input it reads), on one batch."""
    args, kwargs = static.join(arrays)
    out, calls = _record(runner, params, rest, args, kwargs)
    groups, inputs = _groups(calls)
    return jax.tree.leaves(out), [[inputs[k][1].rows(inputs[k][0], None)[0] for k in g.keys] for g in groups]


@functools.partial(jax.jit, static_argnames=("runner", "static", "groups", "trials"))
def _trials(runner, static, groups, trials, params, rest, arrays):
    """Per trial ``(g, candidate)``: whether folding a random positive ``r`` into the candidate (÷ r)
    and into group ``g``'s kernels (rows × r) divides the group's inputs by ``r`` and changes no other
    input nor the block's output, up to float rounding. The block runs vmapped over the trials: one
    compile per block shape."""
    out, inputs = _probe(runner, static, params, rest, arrays)
    r = {g: jax.random.uniform(jax.random.key(g), (groups[g].views[0].d_in,), minval=0.5, maxval=2.0)
         for g, _ in trials}
    want = [jax.tree.leaves((out, [[x / r[g] if h == g else x for x in xs] for h, xs in enumerate(inputs)]))
            for g, _ in trials]
    folded = [_with(params, _fold(params, candidate, groups[g], r[g])) for g, candidate in trials]

    def exact(trial, want):
        got = jax.tree.leaves(_probe(runner, static, trial, rest, arrays))
        return functools.reduce(jnp.logical_and, [_close(a, b) for a, b in zip(got, want)], jnp.asarray(True))
    stack = functools.partial(jax.tree.map, lambda *xs: jnp.stack(xs))
    return jax.vmap(exact)(stack(*folded), stack(*want))


def _close(a: jax.Array, b: jax.Array) -> jax.Array:
    """Equal up to float rounding, relative to the largest value of ``b`` (traced bool)."""
    if not jnp.issubdtype(b.dtype, jnp.floating):
        return jnp.array_equal(a, b)
    tol = max(1e-4, 4 * float(jnp.finfo(b.dtype).eps))
    return jnp.max(jnp.abs(a - b), initial=0.0) <= tol * jnp.max(jnp.abs(b), initial=0.0)


def _first(out: Any) -> jax.Array:
    return out[0] if isinstance(out, (tuple, list)) else out


# ---------------------------------------------------------------- inputs

def _as_call(batch: Any) -> tuple[tuple, dict]:
    if isinstance(batch, dict):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


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


# ---------------------------------------------------------------- the pipeline's values

@dataclasses.dataclass
class _Data:
    """The calibration set as the current block sees it: its array arguments per batch (the
    non-array part is ``static``, the same for every block), and each batch's row mask."""

    static: _model.Static
    inputs: list[list]
    masks: list[jax.Array | None]


@dataclasses.dataclass(frozen=True)
class _Producer:
    """The module (a path inside the block) whose output channels are a group's input channels:
    dividing its leaves along them by ``s`` divides the group's input by ``s`` and nothing else."""

    module: str
    view: _linear.View | None  # a targeted linear's kernel view (its output columns); None: no kernel


@dataclasses.dataclass(frozen=True)
class _Step:
    """One block, how it runs alone, and its targeted layers grouped by shared input (its layout).

    ``producers``: the :class:`_Producer` (or None) of each group that migrates scales, found once per
    block shape when first needed (shared by the blocks of one shape)."""

    block: _model.Block
    runner: Any
    rest: Any
    groups: list[_Group]
    producers: dict[int, _Producer | None] = dataclasses.field(default_factory=dict)

    def targets(self) -> list[str]:
        """The model paths of the targeted kernels, in call order."""
        return [self.block.param(f"{rel}/kernel") for g in self.groups for rel in g.paths]


@dataclasses.dataclass(frozen=True)
class _Layer:
    """One solved layer (one layer of a stacked kernel)."""

    param: str  # the kernel's path in the model
    index: int | None  # its layer in a stacked kernel
    name: str  # its name in messages and the report
    solved: _solve.Solved
    view: _linear.View
    plan: _recipe.Plan
    note: str = ""  # appended to the report's method text, e.g. " (no fold)"


# ---------------------------------------------------------------- the engine

def compress(model_or_apply: Any, params: Any, calibration_batches: Iterable[Any], recipe: _recipe.Recipe, *,
             blocks: str | None = None, mesh: Any = None, progress: bool = True,
             row_mask: Callable[[Any], jax.typing.ArrayLike] | None = None, sequential: bool = False,
             data_axis: str = "data",
             on_block: Callable[[str, dict[str, Any], tuple[LayerRow, ...]], None] | None = None,
             finished: Mapping[str, tuple[dict[str, Any], tuple[LayerRow, ...]]] | None = None
             ) -> tuple[Any, Report]:
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
      on_block: called as ``on_block(block_name, leaves, rows)`` when a block (not a layer of a stack)
        is done: its compressed leaves by model path, and its report rows. Save them to resume.
      finished: ``{block_name: (leaves, rows)}`` of blocks done by an earlier, interrupted run (what
        ``on_block`` got): they are not calibrated or solved again; their compressed leaves run forward
        to give the next block's inputs, so the result is the uninterrupted run's, bit for bit.

    Parameters may be lazy (``jb.zoo.load_llama(..., lazy=True)``: leaves that are read only when
    their block is reached; those outside the blocks, such as embeddings, only while the first
    block's inputs are captured, and again when returned); then one float block is held at a time,
    plus the compressed result.

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
    if not isinstance(recipe, _recipe.Recipe):
        raise TypeError(f"compress needs a jb.Recipe, got {type(recipe).__name__}")
    clock: dict[str, float] = {}
    token = _CLOCK.set(clock)
    try:
        return _pipeline(model_or_apply, params, calibration_batches, recipe, blocks=blocks, mesh=mesh,
                         progress=progress, row_mask=row_mask, sequential=sequential, data_axis=data_axis,
                         on_block=on_block, finished=finished, clock=clock)
    finally:
        _CLOCK.reset(token)


def _pipeline(model_or_apply: Any, params: Any, calibration_batches: Iterable[Any], recipe: _recipe.Recipe, *,
              blocks: str | None, mesh: Any, progress: bool, row_mask: Callable[[Any], jax.typing.ArrayLike] | None,
              sequential: bool, data_axis: str, on_block: Callable | None,
              finished: Mapping[str, tuple[dict[str, Any], tuple[LayerRow, ...]]] | None,
              clock: dict[str, float]) -> tuple[Any, Report]:
    """:func:`compress`, its phases timed in ``clock``."""
    start = time.perf_counter()
    model = _model.wrap(model_or_apply, params)
    working = _leaves.densify(model.params)
    with _phase("capture"):
        data, steps = _prepare(model, working, calibration_batches, blocks, row_mask, mesh, data_axis)
        jax.block_until_ready(data.inputs)
    plans = _plans(model, recipe, {param for step in steps for param in step.targets()})
    work = _up_to_last_planned(steps, plans)
    layers: list[_Layer] = []
    rows: list[LayerRow] = []
    done: dict[str, Any] = {}  # compressed leaves of the blocks assembled so far
    folded: dict[str, dict[int | None, jax.Array]] = {}  # leaves only a migration changed, per layer
    runs = 0
    for step in tqdm(work, desc="oneshot", unit="block", disable=not progress, leave=False):
        own = step.block.index is None  # its kernels are its own (not layers of a stack): assembled now
        with _phase("load"):  # lazy parameters are read here, once per block
            jax.block_until_ready(model.block_params(working, step.block))
        saved = (finished or {}).get(step.block.name) if own else None
        if saved is None:
            first = len(layers)
            current, passes = _compress_block(model, working, step, data, plans, layers, folded,
                                              sequential=sequential, mesh=mesh)
            if own:  # this block's folded leaves are the only ones of no stack layer
                mine = {p: folded.pop(p) for p in [p for p, v in folded.items() if None in v]}
                saved = (_assemble(model.flat(), layers[first:], mine),
                         tuple(_row(layer) for layer in layers[first:]))
                del layers[first:]  # their float solutions: the block's result is its compressed leaves
                if on_block is not None:
                    on_block(step.block.name, *saved)
        else:
            passes = 0
        if saved is not None:
            done.update(saved[0])
            rows.extend(saved[1])
            # the next block's inputs come from the compressed leaves themselves, resumed or not
            current = model.with_kernels(model.block_params(working, step.block), _in_block(step.block, saved[0]))
        if not step.block.whole:  # the whole model feeds no next block
            data, passes = _propagate(step, data, current), passes + 1
        del current  # the block's dense weights (a float block): not held while the next one is compressed
        runs += passes
    done.update(_assemble(model.flat(), layers, folded))
    rows.extend(_row(layer) for layer in layers)
    compressed = model.result(_model.read_lazy(model.with_kernels(model.params, done)))
    return compressed, Report(rows=tuple(rows), blocks=len(steps),
                              block_passes=runs / max(len(work), 1), seconds=time.perf_counter() - start,
                              phases=dict(clock))


def _in_block(block: _model.Block, leaves: dict[str, Any]) -> dict[str, Any]:
    """Compressed leaves (by model path) as the dense kernels the block runs with (by path inside it)."""
    cut = 0 if block.whole else len(block.path) + 1
    return {p[cut:]: _leaves.densify(leaf) for p, leaf in leaves.items()}


def _plans(model: _model.Model, recipe: _recipe.Recipe, targets: set[str]) -> dict[str, _recipe.Plan]:
    """The plan of each targeted kernel (by its path in the model) that the recipe plans."""
    chosen = dict(zip(model.flat(), jax.tree.leaves(_tree.select(model.params, recipe.where))))
    values = _tree.assign(model.params, list(recipe.rules), where=lambda p, x: p in targets and chosen.get(p, False),
                          what="recipe")
    return {p: v for p, v in zip(model.flat(), jax.tree.leaves(values, is_leaf=lambda v: v is None or isinstance(
        v, _recipe.Plan))) if isinstance(v, _recipe.Plan)}


def _prepare(model: _model.Model, working: Any, calibration_batches: Iterable[Any], blocks: str | None,
             row_mask: Callable[[Any], jax.typing.ArrayLike] | None, mesh: Any, data_axis: str
             ) -> tuple[_Data, list[_Step]]:
    """Prepare batches (read once: any iterable), find the blocks, capture the first block's inputs,
    and lay out each block shape once."""
    shape = np.shape(calibration_batches) if isinstance(calibration_batches, (np.ndarray, jax.Array)) else None
    hint = "" if shape is None else (f" (calibration_batches is one array, read as {shape[0]} batches of shape "
                                     f"{shape[1:]}; pass [x] for one batch)")
    given = list(calibration_batches)
    raw = [_as_call(b) for b in given]
    _check_batches(raw)
    masks = [None if row_mask is None else jnp.asarray(row_mask(b)) for b in given]
    batches = [_place(b, mesh, data_axis) for b in raw]
    block_list = model.blocks(blocks, _on_batch0(lambda: model.stacked(*batches[0]), hint))
    block_list = _model.in_call_order(block_list, _on_batch0(lambda: model.call_order(block_list, *batches[0]), hint))
    front = model.outside(working, block_list)  # lazy embeddings read for the capture only
    first = _on_batch0(lambda: model.capture(front, block_list[0], *batches[0]),
                       ("" if block_list[0].whole else f" up to {block_list[0].name}") + hint)
    static, first_arrays = _model.Static.split(*first)
    inputs = [first_arrays] + [_model.Static.split(*model.capture(front, block_list[0], *b))[1]
                               for b in batches[1:]]
    data = _Data(static, inputs, masks)
    return data, _block_layouts(model, working, block_list, batches[0], data)


def _block_layouts(model: _model.Model, working: Any, block_list: list[_model.Block], batch: tuple[tuple, dict],
                   data: _Data) -> list[_Step]:
    """Each block with its runner and layout; blocks of one shape share both (one abstract trace)."""
    layouts: dict[Any, tuple[list[_Group], dict]] = {}
    steps = []
    for block, (runner, rest) in zip(block_list, model.runners(block_list, *batch)):
        if runner not in layouts:
            layouts[runner] = (_layout(runner, data.static, model.block_params(working, block, read=False), rest,
                                       data.inputs[0]), {})
        steps.append(_Step(block, runner, rest, *layouts[runner]))
    return steps


def _up_to_last_planned(steps: list[_Step], plans: dict[str, _recipe.Plan]) -> list[_Step]:
    """The blocks up to the last one with a planned layer: later blocks need no inputs."""
    planned = [i for i, step in enumerate(steps) if any(param in plans for param in step.targets())]
    return steps[:max(planned, default=-1) + 1]


def _compress_block(model: _model.Model, working: Any, step: _Step, data: _Data, plans: dict[str, _recipe.Plan],
                    layers: list[_Layer], folded: dict[str, dict[int | None, jax.Array]], *, sequential: bool,
                    mesh: Any) -> tuple[Any, int]:
    """Calibrate, then solve, the block's planned layers: every group from one block run, or one run
    per group when ``sequential``. Groups whose methods migrate scales first get them from one run of
    the float block, all folded before anything is solved (:func:`_migrate`; the folded leaves are
    recorded in ``folded`` by model path and layer). Appends each solved layer to ``layers``; returns
    the block's parameters with its folded and compressed leaves and the number of block runs."""
    planned = [g for g, group in enumerate(step.groups)
               if any(step.block.param(f"{p}/kernel") in plans for p in group.paths)]
    stages = [[g] for g in planned] if sequential else ([planned] if planned else [])
    base = model.block_params(working, step.block)
    migrations = _migrations(step, planned, plans)
    new: dict[str, jax.Array] = {}
    notes: dict[int, str] = {}
    given: dict[int, jax.Array] | None = None
    runs = 0
    if migrations:
        first = list(migrations) if sequential else planned
        hessians, stats = _calibrate(step, first, base, data, extra=tuple(migrations))
        runs += 1
        new, scales, notes, searched = _migrate(model, step, base, data, migrations, stats, plans)
        runs += searched
        for rel, value in new.items():
            if step.block.param(rel) not in plans:  # a planned kernel's solved layer holds its folded value
                folded.setdefault(step.block.param(rel), {})[step.block.index] = value
        if not sequential:  # the inputs of a migrated group are now x / s: its Hessian, exactly
            given = {g: h if g not in scales else h / jnp.outer(scales[g], scales[g]) for g, h in zip(first, hessians)}
    for stage in stages:
        if given is None:
            hessians = _calibrate(step, stage, model.with_kernels(base, new), data)[0]
            runs += 1
        else:
            hessians = [given.pop(g) for g in stage]
        current = model.with_kernels(base, new)
        for g in stage:
            hessian = hessians.pop(0)  # each Hessian is dropped once its group is solved
            for rel, kernel, layer in _solve_group(model, current, step, step.groups[g], hessian, plans, mesh,
                                                   notes.get(g, "")):
                new[f"{rel}/kernel"] = kernel
                layers.append(layer)
    return model.with_kernels(base, new), runs


@_timed("calibrate")
def _calibrate(step: _Step, stage: list[int], params: Any, data: _Data, extra: tuple[int, ...] = ()
               ) -> tuple[list[jax.Array], dict[int, _recipe.InputStats]]:
    """The input Hessians ``X^T X`` of the groups in ``stage`` over all calibration batches (one block
    run), and the full :class:`InputStats` of the groups in ``extra``."""
    stats = None
    for arrays, mask in zip(data.inputs, data.masks):
        got = _stage_hessians(step.runner, data.static, tuple(stage), params, step.rest, arrays, mask, extra)
        stats = got if stats is None else _accumulate(stats, got)
    assert stats is not None  # _check_batches: at least one batch
    full = {g: _recipe.InputStats(h, top, total / jnp.maximum(n, 1.0))
            for g, (h, n, top, total) in zip(stage, stats) if g in extra}
    return [h for h, *_ in stats], full


# ---------------------------------------------------------------- migration (AWQ, SmoothQuant)

def _migrations(step: _Step, planned: list[int], plans: dict[str, _recipe.Plan]) -> dict[int, _recipe.Method]:
    """The method that migrates scales for each planned group that has one (its layers share it)."""
    out = {}
    for g in planned:
        group = step.groups[g]
        chosen = {rel: next((m for m in plan.methods if m.migrates), None) for rel in group.paths
                  if (plan := plans.get(step.block.param(f"{rel}/kernel"))) is not None}
        if not any(chosen.values()):
            continue
        if len(set(chosen.values())) > 1:
            names = ", ".join(f"{step.block.label(rel)} ({'none' if m is None else m.describe()})"
                              for rel, m in chosen.items())
            raise ValueError(f"layers that read one input share one migration of scales (folded into the op "
                             f"producing that input); give them one plan's migrating method, got: {names}")
        out[g] = next(m for m in chosen.values() if m is not None)
    return out


@_timed("solve")
def _migrate(model: _model.Model, step: _Step, base: Any, data: _Data, migrations: dict[int, _recipe.Method],
             stats: dict[int, _recipe.InputStats], plans: dict[str, _recipe.Plan]
             ) -> tuple[dict[str, jax.Array], dict[int, jax.Array], dict[int, str], int]:
    """Every migrating group's scales from the float block's kernels and statistics, then all of them
    folded: ``(folded leaves by path inside the block, scales by group, report notes by group, block runs
    of the scales' searches)``. A group whose input no module of the block produces alone is not
    migrated: it is noted ``(no fold)``."""
    _find_producers(step, base, data, list(migrations))
    passes = [0]  # block runs of InputStats.output_error, each candidate counted as one
    scales: dict[int, jax.Array] = {}
    notes: dict[int, str] = {}
    for g, method in migrations.items():
        group = step.groups[g]
        if step.producers[g] is None:
            notes[g] = " (no fold)"
            continue
        planned = tuple((rel, view) for rel, view in zip(group.paths, group.views)
                        if step.block.param(f"{rel}/kernel") in plans)
        kernels = tuple(view.matrix(model.kernel(base, _model.Block(""), rel)) for rel, view in planned)
        s = method.input_scales(kernels, stats[g]._replace(output_error=_output_error(step, base, data, g, planned,
                                                                                       passes)))
        if s is not None:
            scales[g] = jnp.asarray(s, jnp.float32)
    params, new = base, dict[str, jax.Array]()
    for g, s in scales.items():
        fold = _fold(params, step.producers[g], step.groups[g], s)  # type: ignore[arg-type]  # has a producer
        params, new = _with(params, fold), {**new, **fold}
    return new, scales, notes, passes[0]


def _output_error(step: _Step, params: Any, data: _Data, g: int, planned: tuple[tuple[str, _linear.View], ...],
                  passes: list[int]) -> Callable[..., jax.Array]:
    """:attr:`InputStats.output_error` of group ``g``: candidate scales ``(n, d_in)`` and a weight format
    -> ``(n,)`` squared errors, summed over the calibration rows (the row mask weighs them), of the
    output at :func:`_measure_point` (the block's output with ``block``), the ``planned`` kernels
    being ``diag(1/s) Q(diag(s) W)`` and every other leaf the float ``params``. The block runs once per
    chunk of candidates (:func:`_grid_chunk`) per batch, vmapped over the chunk; ``passes[0]`` counts the
    block runs (the float one, then one per candidate)."""
    def measure(candidates: jax.Array, spec: Any, *, block: bool = False) -> jax.Array:
        point = None if block else _measure_point(step, g)
        chunk = _grid_chunk(step, data.inputs[0], planned, candidates.shape[0])
        total = jnp.zeros(candidates.shape[0], jnp.float32)
        for arrays, mask in zip(data.inputs, data.masks):
            want = _point_output(step.runner, data.static, point, params, step.rest, arrays)
            total = total + _scale_errors(step.runner, data.static, point, spec, planned, chunk, params, step.rest,
                                          arrays, mask, want, candidates)
        passes[0] += 1 + candidates.shape[0]
        return total
    return measure


def _measure_point(step: _Step, g: int) -> str | None:
    """Where AWQ's reference measures group ``g``'s error: the output of the module the group feeds,
    read at the last targeted linear the block calls under the group's common parent module
    (Llama's q/k/v: ``self_attn`` -> ``o_proj``; gate/up: ``mlp`` -> ``down_proj``); a lone layer's own
    output; None (the block's output) when that last linear is one of the group (e.g. BERT's
    ``attention/self`` holds only q/k/v)."""
    paths = step.groups[g].paths
    if len(paths) == 1:
        return paths[0]
    common: list[str] = []
    for names in zip(*(p.split("/")[:-1] for p in paths)):
        if len(set(names)) > 1:
            break
        common.append(names[0])
    prefix = "/".join(common)
    under = [p for group in step.groups for p in group.paths if not prefix or p.startswith(f"{prefix}/")]
    return None if under[-1] in paths else under[-1]


def _grid_chunk(step: _Step, arrays: list, planned: tuple[tuple[str, _linear.View], ...], n: int) -> int:
    """Candidates per block run: as many as keep the run's outputs of every targeted linear plus the
    candidate kernels within about 512 MiB (float32), at least one."""
    x = arrays[0]
    rows = np.size(x) // max(np.shape(x)[-1], 1) if np.ndim(x) else 1
    widths = sum(view.d_out for group in step.groups for view in group.views)
    per = 4 * (rows * widths + sum(view.d_in * view.d_out for _, view in planned))
    return int(min(n, max(1, (512 << 20) // per)))


def _measured(runner: Any, static: _model.Static, point: str | None, params: Any, rest: Any, arrays: list
              ) -> jax.Array:
    """The output of the linear at ``point`` (a path inside the block), or the block's output (None)."""
    args, kwargs = static.join(arrays)
    fn = runner.bind(params, rest)
    if point is None:
        return _first(fn(*args, **kwargs))
    seen = []

    def impl(call):
        seen.append(call.run())
        return seen[-1]
    _intercept.replace(fn, lambda path, module: path == point and _is_target(path, module), impl)(*args, **kwargs)
    return seen[-1]


_point_output = jax.jit(_measured, static_argnames=("runner", "static", "point"))


@functools.partial(jax.jit, static_argnames=("runner", "static", "point", "spec", "planned", "chunk"))
def _scale_errors(runner, static, point, spec, planned, chunk, params, rest, arrays, mask, want, candidates):
    flat = _leaves_of(params)

    def error(s):
        new = {}
        for rel, view in planned:
            x = flat[f"{rel}/kernel"]
            w = view.matrix(x).astype(jnp.float32)
            new[f"{rel}/kernel"] = view.unview(spec.fake_quant(w * s[:, None]) / s[:, None]).astype(x.dtype)
        d = jnp.square(_measured(runner, static, point, _with(params, new), rest, arrays).astype(jnp.float32)
                       - want.astype(jnp.float32))
        if mask is not None:
            m = jnp.asarray(mask, jnp.float32)
            d = d * m.reshape(m.shape + (1,) * (d.ndim - m.ndim))
        return jnp.sum(d)
    return jax.lax.map(error, candidates, batch_size=chunk)


def _leaves_of(params: Any) -> dict[str, jax.Array]:
    return dict(zip(_tree.paths(params), jax.tree.leaves(params)))


def _with(params: Any, new: dict[str, jax.Array]) -> Any:
    """``params`` (a block's) with the leaves at the paths of ``new`` replaced."""
    return _tree.map_with_path(lambda p, x: new.get(p, x), params)


def _fold(params: Any, producer: _Producer, group: _Group, s: jax.Array) -> dict[str, jax.Array]:
    """The producer's leaves divided by ``s`` along its output channels, the group's kernels' rows times ``s``."""
    flat = _leaves_of(params)
    out = {}
    for path, x in flat.items():
        if path.rpartition("/")[0] != producer.module:
            continue
        if producer.view is not None and path == f"{producer.module}/kernel":
            view = producer.view
            out[path] = view.unview(_quant.unscale_output_channels(view.matrix(x), s, path=path)).astype(x.dtype)
        else:  # a norm's scale or bias, a linear's bias: one value per output channel
            out[path] = _quant.unscale_output_channels(jnp.reshape(x, -1), s.astype(x.dtype), path=path
                                                       ).reshape(np.shape(x))
    for rel, view in zip(group.paths, group.views):
        path = f"{rel}/kernel"
        x = flat[path]
        out[path] = view.unview(_quant.scale_input_channels(view.matrix(x), s, path=path)).astype(x.dtype)
    return out


def _candidates(step: _Step, params: Any, g: int) -> list[_Producer]:
    """Modules of the block that may produce group ``g``'s input: each of their leaves holds one value
    per output channel (a norm's scale and bias), or is the kernel of a targeted linear whose output
    width is the group's input width."""
    group = step.groups[g]
    d_in = group.views[0].d_in
    views = {rel: view for other in step.groups for rel, view in zip(other.paths, other.views)}
    by_module: dict[str, list[tuple[str, Any]]] = {}
    for path, x in _leaves_of(params).items():
        module, _, name = path.rpartition("/")
        by_module.setdefault(module, []).append((name, x))
    out = []
    for module, leaves in by_module.items():
        view = views.get(module)
        if not module or module in group.paths or (view is not None and view.d_out != d_in):
            continue
        if all((view is not None and name == "kernel") or np.size(x) == d_in for name, x in leaves):
            out.append(_Producer(module, view))
    return out


def _find_producers(step: _Step, params: Any, data: _Data, groups: list[int]) -> None:
    """Fills ``step.producers`` for ``groups`` (once per block shape), by trial on calibration batch 0:
    for each group, the first candidate module (:func:`_candidates`) that folds exactly
    (:func:`_trials`), or None."""
    todo = [g for g in groups if g not in step.producers]
    trials = tuple((g, candidate) for g in todo for candidate in _candidates(step, params, g))
    exact = _trials(step.runner, data.static, tuple(step.groups), trials, params, step.rest,
                    data.inputs[0]) if trials else []
    for g in todo:
        step.producers[g] = next((c for (h, c), ok in zip(trials, exact) if h == g and bool(ok)), None)


@_timed("solve")
def _solve_group(model: _model.Model, params: Any, step: _Step, group: _Group, hessian: jax.Array,
                 plans: dict[str, _recipe.Plan], mesh: Any, note: str = "") -> list[tuple[str, jax.Array, _Layer]]:
    """Solves the planned layers of one group on their shared Hessian: ``(path inside the block, new
    kernel in its layout, solved layer)`` each; ``params``: the block's current parameters."""
    names = [step.block.label(p) for p in group.paths]
    if not bool(_all_finite(hessian)):
        raise ValueError(f"{', '.join(names)}: NaN or inf in the calibration inputs of these layers")
    hessian = _replicated(hessian, mesh)
    out = []
    for rel, view, name in zip(group.paths, group.views, names):
        param = step.block.param(f"{rel}/kernel")
        plan = plans.get(param)
        if plan is None:
            continue
        kernel = model.kernel(params, _model.Block(""), rel)
        solved = _solve.solve(name, _replicated(view.matrix(kernel), mesh), hessian, plan)
        out.append((rel, view.unview(solved.matrix).astype(kernel.dtype),
                    _Layer(param, step.block.index, name, solved, view, plan, note)))
    return out


@jax.jit  # one program per Hessian width, not one per op
def _all_finite(x: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(x))


@_timed("propagate")
def _propagate(step: _Step, data: _Data, params: Any) -> _Data:
    """The block's outputs on its compressed parameters: the next block's inputs (the program of its
    statistics runs, :func:`_block_run`; the rows are dropped)."""
    return dataclasses.replace(data, inputs=[
        _next_inputs(step.block, arrays, _block_run(step.runner, data.static, params, step.rest, arrays, mask,
                                                    extra=())[0])
        for arrays, mask in zip(data.inputs, data.masks)])


@_timed("assemble")
def _assemble(flat: dict[str, Any], layers: list[_Layer],
              folded: dict[str, dict[int | None, jax.Array]] | None = None) -> dict[str, Any]:
    """The compressed leaf of each solved kernel (by its path), from its layers; and each leaf that
    only a migration changed (a norm's scale, an unplanned kernel), from its folded layers."""
    by_param: dict[str, dict[int | None, _Layer]] = {}
    for layer in layers:
        by_param.setdefault(layer.param, {})[layer.index] = layer
    out = {p: _refolded(flat[p], values) for p, values in (folded or {}).items() if p not in by_param}
    return {**out, **{p: _leaf(p, flat[p], pieces) for p, pieces in by_param.items()}}


def _refolded(leaf: Any, values: dict[int | None, jax.Array]) -> jax.Array:
    """``leaf`` with its folded value (of each folded layer of a stack)."""
    new = jnp.asarray(values[None]) if None in values else jnp.asarray(leaf)
    for i, value in values.items():
        if i is not None:
            new = new.at[i].set(value)
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        new = jax.device_put(new, sharding)
    return new.astype(leaf.dtype)


def _on_batch0(run: Callable[[], Any], where: str) -> Any:
    """``run()``; an error of the model on calibration batch 0 is bad input, reported as such."""
    try:
        return run()
    except Exception as e:
        raise ValueError(f"calibration batch 0 does not run through the model{where}: {type(e).__name__}: {e}") from e


def _next_inputs(block: _model.Block, arrays: list, out: Any) -> list:
    x = _first(out)
    if np.shape(x) != np.shape(arrays[0]) or x.dtype != arrays[0].dtype:
        raise ValueError(f"{block.name}: block output {np.shape(x)} {x.dtype} cannot feed the next block, whose "
                         f"first argument is {np.shape(arrays[0])} {arrays[0].dtype}")
    return [x, *arrays[1:]]


def _row(layer: _Layer) -> LayerRow:
    q = layer.plan.quantizer
    bits = getattr(q.spec, "bits", None) if q is not None else None
    return LayerRow(path=layer.name, method=layer.plan.describe() + layer.note,
                    shape=(layer.view.d_in, layer.view.d_out),
                    sparsity=float(np.mean(np.asarray(layer.solved.matrix) == 0)), bits=bits, error=layer.solved.error,
                    energy=layer.solved.energy)


def _leaf(path: str, leaf: Any, pieces: dict[int | None, _Layer]) -> Any:
    """The compressed leaf from its per-layer pieces (one, or one per layer of a stack)."""
    order = [None] if None in pieces else list(range(len(pieces)))
    ps = [pieces[i] for i in order]
    quantizer, first = ps[0].plan.quantizer, ps[0].solved
    if quantizer is not None and first.quant is not None and order == [None] and ps[0].view.is_identity:
        # the solver's codes and scales are already in the leaf's layout: no program per leaf shape to
        # quantize its dense value again (the same codes: it is that value on that grid)
        return _leaves.place_like(first.quant, leaf).replace(dense_dtype=np.dtype(leaf.dtype))
    stack = (lambda xs: xs[0]) if order == [None] else (lambda xs: jnp.stack(xs))
    dense = stack([p.view.unview(p.solved.matrix) for p in ps])
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        dense = jax.device_put(dense, sharding)
    if quantizer is None:
        return dense.astype(leaf.dtype)
    if first.quant is None:  # a format without solver-chosen scales (float8, binary...): its own layout
        return quantizer.spec.quantize(dense.astype(leaf.dtype), path=path)
    scale = stack([p.view.scale_layout(p.solved.quant.scale, path) for p in ps])
    zero = None if first.quant.zero_point is None else stack(
        [p.view.scale_layout(p.solved.quant.zero_point, path) for p in ps])
    q = quantizer.spec.quantize(dense, scale, zero, path=path)
    return q.replace(dense_dtype=np.dtype(leaf.dtype))
