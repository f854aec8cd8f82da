"""Linen and nnx models seen as a chain of blocks: find them, capture their inputs, run one alone.

A *block* is a repeated submodule (``layer_0`` ... ``layer_N`` in linen, ``layers/0`` ... in nnx) or
one layer of a stacked submodule: an ``nnx.scan``-stacked one (the top module over a stacked
linear's layers) or the body of a linen ``nn.scan`` with ``variable_axes={"params": 0}`` (the module
whose call sees each of its parameters without the leading axis it is stored with), or the one
numbered submodule that holds layers (a one-layer decoder's ``layers/0``). A model with none of these
(an MLP, a small CNN) is one block: the whole model, run on the calibration batches as given.
Assumptions, checked where they can be:

- each block is called once, through ``__call__`` (checked: blocks are taken in the order the model
  calls them, found in an abstract run, and a block called twice is refused); the *i+1*-th block
  called gets the *i*-th one's output as its first positional argument (the first element when it
  returns a tuple), and every other argument is the same for all blocks (attention masks, positions;
  for a linen ``nn.scan``: ``in_axes=nn.broadcast``);
- a block's parameters are the subtree under its module path (for a stacked block: index ``i`` of
  the leading axis of every leaf under it).

The inputs of the first block are captured by running the model eagerly (``jax.disable_jit``, so a
scanned model's loop runs in Python) until the first block is called on concrete inputs: only the
embeddings run.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxopt_big import _checks
from jaxopt_big import intercept as _intercept
from jaxopt_big import leaves as _leaves
from jaxopt_big import tree as _tree
from jaxopt_big.oneshot import _linear

__all__ = ["Block", "Model", "wrap", "Static", "in_call_order", "is_lazy", "read_lazy"]


def is_lazy(x: Any) -> bool:
    """Whether ``x`` is a parameter not read yet: a ``jax.ShapeDtypeStruct`` with a ``read()`` method
    (``jb.zoo.load_llama(..., lazy=True)`` makes them); the engine reads it when it reaches its block."""
    return isinstance(x, jax.ShapeDtypeStruct) and callable(getattr(x, "read", None))


def read_lazy(tree: Any) -> Any:
    """``tree`` with its lazy leaves read."""
    return jax.tree.map(lambda x: x.read() if is_lazy(x) else x, tree, is_leaf=_leaves.is_compressed)


@dataclasses.dataclass(frozen=True)
class Block:
    """One block: its module path, and its layer in a stacked block (None when unrolled)."""

    path: str  # "" for the whole model
    index: int | None = None

    @property
    def whole(self) -> bool:
        """Whether the block is the whole model (one without repeated blocks)."""
        return not self.path

    @property
    def name(self) -> str:
        return self.path if self.index is None else f"{self.path}[{self.index}]"

    def param(self, rel: str) -> str:
        """The model path of ``rel``, a path inside the block."""
        return rel if self.whole else f"{self.path}/{rel}"

    def label(self, rel: str) -> str:
        """``rel`` named for the report (with the layer of a stacked block)."""
        return rel if self.whole else f"{self.name}/{rel}"


class _Stop(Exception):
    """Raised by the first block call while capturing: nothing after the embeddings runs."""

    def __init__(self, args, kwargs):
        super().__init__()
        self.args_, self.kwargs = args, kwargs


@dataclasses.dataclass(frozen=True)
class Static:
    """The non-array part of a block call (hashable, a jit static argument) and how to rebuild it."""

    treedef: Any
    constants: tuple[tuple[int, Any], ...]

    @classmethod
    def split(cls, args: tuple, kwargs: dict) -> tuple[Static, list[jax.Array | np.ndarray]]:
        leaves, treedef = jax.tree.flatten((tuple(args), dict(kwargs)))
        arrays: list[jax.Array | np.ndarray] = []
        constants: list[tuple[int, Any]] = []
        for i, x in enumerate(leaves):
            if isinstance(x, (jax.Array, np.ndarray)):
                arrays.append(x)
            else:
                constants.append((i, x))
        return cls(treedef, tuple(constants)), arrays

    def join(self, arrays: list[jax.Array]) -> tuple[tuple, dict]:
        constants, it = dict(self.constants), iter(arrays)
        leaves = [constants[i] if i in constants else next(it) for i in range(self.treedef.num_leaves)]
        return jax.tree.unflatten(self.treedef, leaves)


@dataclasses.dataclass(frozen=True)
class _LinenRunner:
    module: nn.Module  # unbound clone; equal (and hashing equal) for blocks of the same shape

    def bind(self, params: Any, rest: Any) -> Callable:
        return lambda *args, **kwargs: self.module.apply({"params": params, **rest}, *args, **kwargs)


@dataclasses.dataclass(frozen=True)
class _ApplyRunner:
    apply: Callable  # the caller's linen apply function: the whole model, as the caller runs it

    def bind(self, params: Any, rest: Any) -> Callable:
        return lambda *args, **kwargs: self.apply({"params": params, **rest}, *args, **kwargs)


@dataclasses.dataclass(frozen=True)
class _NnxRunner:
    graphdef: Any

    def bind(self, params: Any, rest: Any) -> Callable:
        return nnx.merge(self.graphdef, params, rest)


def _numbered(name: str) -> tuple[str, int] | None:
    """``("layer_", 3)`` for ``"layer_3"``; None for a name that does not end in digits."""
    stem = name.rstrip("0123456789")
    return (stem, int(name[len(stem):])) if stem != name else None


def _natural(path: str) -> list[tuple[str, int]]:
    """A sort key that orders ``layer_2`` before ``layer_10``."""
    return [(stem, n) for stem, n in (_numbered(part) or (part, -1) for part in path.split("/"))]


def _module_paths(paths: list[str]) -> set[str]:
    out: set[str] = set()
    for p in paths:
        parts = p.split("/")
        out.update("/".join(parts[:i]) for i in range(1, len(parts)))
    return out


def _under(path: str, module: str) -> bool:
    return path.startswith(module + "/")


def _signature(flat: dict[str, Any], module: str) -> tuple:
    return tuple(sorted((p[len(module):], tuple(np.shape(x))) for p, x in flat.items() if _under(p, module)))


def _repeated(flat: dict[str, Any], is_kernel: Callable[[str], bool]) -> list[str]:
    """The largest group of numbered sibling modules with identical parameter shapes that hold kernels;
    else the one numbered module that holds layers (not a kernel of its own): a one-layer decoder's
    ``layers/0``, a block whose head outside stays as given."""
    groups: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for module in _module_paths(list(flat)):
        parent, _, name = module.rpartition("/")
        numbered = _numbered(name)
        if numbered is not None:
            groups.setdefault((parent, numbered[0]), []).append((numbered[1], module))
    best: list[str] = []
    singles: list[str] = []
    for _, numbered_members in sorted(groups.items(), key=lambda kv: kv[0][0].count("/")):
        members = [m for _, m in sorted(numbered_members)]
        if len({_signature(flat, m) for m in members}) != 1:
            continue
        kernels = [p for p in flat if is_kernel(p) and _under(p, members[0])]
        if not kernels:
            continue
        if len(members) == 1:
            if all(p.count("/") > members[0].count("/") + 1 for p in kernels):
                singles.append(members[0])
        elif len(members) > len(best):
            best = members
    return best or (singles if len(singles) == 1 else [])


class Model:
    """A linen or nnx model as blocks; see the module docstring for what is assumed."""

    params: Any
    _captures: dict[str, tuple[dict[str, Any], Callable]]  # first block path -> (its static call, jitted run)
    _read: tuple[Block, Any] | None = None  # the last block whose lazy parameters were read, and them

    def flat(self) -> dict[str, Any]:
        return dict(zip(_tree.paths(self.params), jax.tree.leaves(self.params, is_leaf=_leaves.is_compressed)))

    def blocks(self, pattern: str | None, stacked: str | None) -> list[Block]:
        """The blocks in module order (:func:`in_call_order` puts them in call order): found
        automatically, or the module paths ``pattern`` fully matches.

        ``stacked``: what :meth:`stacked` found.
        """
        flat = self.flat()
        if pattern is None:
            if stacked:
                return [Block(stacked, i) for i in range(_depth(flat, stacked))]
            found = _repeated(flat, lambda p: p.endswith("/kernel") or p.endswith("/weight"))
            return [Block(m) for m in found] if found else [Block("")]
        compiled = _tree.compile_pattern(pattern, what="blocks")
        modules = sorted((m for m in _module_paths(list(flat)) if compiled.fullmatch(m)), key=_natural)
        if not modules:
            raise _tree.no_match_error("blocks", pattern, sorted(_module_paths(list(flat))))
        if stacked is not None and modules == [stacked]:
            return [Block(stacked, i) for i in range(_depth(flat, stacked))]
        return [Block(m) for m in modules]

    def call_order(self, blocks: list[Block], args: tuple, kwargs: dict) -> list[str]:
        """The paths of ``blocks`` in the order the model calls them, once per call (one abstract run on
        ``args, kwargs``); the blocks of a stack or the whole model: as given."""
        if blocks[0].whole or blocks[0].index is not None:
            return [b.path for b in blocks]
        calls: list[str] = []

        def note(call, original):
            calls.append(call.path)
            return original()
        jax.eval_shape(lambda p, a, k: self.call(_leaves.densify(p), a, k, blocks, note), self.params, args, kwargs)
        return calls

    def stacked(self, args: tuple, kwargs: dict) -> str | None:
        """The module path of a stacked block, or None; ``args, kwargs``: one batch, for a model whose
        stack shows only when it runs (linen). Each model kind defines it."""
        raise NotImplementedError

    def runners(self, blocks: list[Block], args: tuple, kwargs: dict) -> list[tuple[Any, Any]]:
        """``(runner, non-parameter state)`` per block; each model kind defines it."""
        raise NotImplementedError

    def call(self, params: Any, args: tuple, kwargs: dict, blocks: Sequence[Block] = (),
             handler: Callable | None = None) -> Any:
        """The model on ``params``; each model kind defines it."""
        raise NotImplementedError

    def result(self, params: Any) -> Any:
        """Compressed parameters in the form the caller gave them."""
        return params

    def block_params(self, params: Any, block: Block, *, read: bool = True) -> Any:
        """The parameters of one block (one layer of a stacked block); its lazy leaves read (once: the
        last block read is kept until another is), or left as they are with ``read=False``."""
        node = params
        for part in () if block.whole else block.path.split("/"):
            node = node[part] if _has_key(node, part) else node[int(part)]
        node = node if block.index is None else jax.tree.map(lambda x: x[block.index], node)
        if not read or not any(is_lazy(x) for x in jax.tree.leaves(node)):
            return node
        if self._read is None or self._read[0] != block:
            self._read = None  # drop the previous block before reading this one
            self._read = (block, read_lazy(node))
        return self._read[1]

    def outside(self, params: Any, blocks: Sequence[Block]) -> Any:
        """``params`` with the lazy leaves outside ``blocks`` read (the embeddings, a head): what the
        model needs to run up to its first block. Held only while the first block's inputs are captured."""
        def read(path: str, x: Any) -> Any:
            inside = any(b.whole or _under(path, b.path) for b in blocks)
            return x.read() if is_lazy(x) and not inside else x
        return _tree.map_with_path(read, params)

    def kernel(self, params: Any, block: Block, rel: str) -> jax.Array:
        """The kernel of layer ``rel`` (a module path inside ``block``) in ``params``: the block's
        layer of it when the block is one layer of a stack."""
        node = params
        for part in block.param(f"{rel}/kernel").split("/"):
            node = node[part] if _has_key(node, part) else node[int(part)]
        if any(is_lazy(x) for x in jax.tree.leaves(node)):  # (an nnx Variable holds it)
            node = self.block_params(params, block)
            for part in f"{rel}/kernel".split("/"):
                node = node[part] if _has_key(node, part) else node[int(part)]
        return jnp.asarray(node if block.index is None else node[block.index])

    def with_kernels(self, params: Any, kernels: dict[str, Any]) -> Any:
        """``params`` (the model's or a block's) with the leaves at the paths of ``kernels`` replaced."""
        return _tree.map_with_path(lambda p, x: kernels.get(p, x), params)

    def capture(self, params: Any, first: Block, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The arguments of the first block's call; only what comes before it is computed.

        Jitted (XLA drops everything after the first block, whose output nothing uses), once per
        batch shape; a scanned stack, or parameters with lazy leaves (not read yet), instead run
        eagerly (``jax.disable_jit``, a scan's loop in Python) and stop at the first block.
        """
        if first.whole:
            return args, kwargs
        if first.index is not None or any(is_lazy(x) for x in jax.tree.leaves(params)):  # eager: lazy leaves unread
            def stop(call, original):
                if any(_checks.is_traced(x) for x in jax.tree.leaves((call.args, call.kwargs))):
                    return original()  # linen's scan traces its body once before its loop
                raise _Stop(call.args, call.kwargs)
            try:
                with jax.disable_jit():
                    self.call(params, args, kwargs, [first], stop)
            except _Stop as s:
                return s.args_, s.kwargs
            raise ValueError(f"{first.name}: the model never called this block")
        if first.path not in self._captures:
            found: dict[str, Any] = {}

            def grab(call, original):
                found.setdefault("call", Static.split(call.args, call.kwargs))
                return original()

            def run(params, args, kwargs):
                self.call(params, args, kwargs, [first], grab)
                if "call" not in found:
                    raise ValueError(f"{first.name}: the model never called this block")
                return found["call"][1]
            self._captures[first.path] = (found, jax.jit(run))
        found, run = self._captures[first.path]
        arrays = run(params, args, kwargs)
        return found["call"][0].join(arrays)


def in_call_order(blocks: list[Block], calls: list[str]) -> list[Block]:
    """``blocks`` in the order of ``calls`` (:meth:`Model.call_order`).

    Raises:
      ValueError: a block called more than once (the engine would calibrate it on its first call only)
        or never (it would be calibrated on another block's output).
    """
    if blocks[0].whole or blocks[0].index is not None:
        return blocks
    by_path = {b.path: b for b in blocks}
    for b in blocks:
        n = calls.count(b.path)
        if n != 1:
            raise ValueError(f"{b.name}: the model calls this block {n} times (block calls in order: {calls}); "
                             "block-wise compression needs each block called once: name other blocks with blocks=")
    return [by_path[p] for p in calls]


def _depth(flat: dict[str, Any], module: str) -> int:
    return int(next(np.shape(x)[0] for p, x in flat.items() if _under(p, module)))


def _has_key(node: Any, key: str) -> bool:
    try:
        return key in node
    except TypeError:
        return False


class _Linen(Model):
    def __init__(self, apply: Callable, params: Any, extra: dict | None):
        self.apply, self.params, self.extra = apply, params, extra
        self._captures = {}

    def result(self, params: Any) -> Any:
        return params if self.extra is None else {**self.extra, "params": params}

    def call(self, params: Any, args: tuple, kwargs: dict, blocks: Sequence[Block] = (),
             handler: Callable | None = None) -> Any:
        """The model on ``params``; calls of ``blocks`` go to ``handler(call, original)``."""
        return _routed(lambda: self.apply({"params": params, **(self.extra or {})}, *args, **kwargs),
                       blocks, handler, nn.Module)()

    def stacked(self, args: tuple, kwargs: dict) -> str | None:
        """The outermost ``nn.scan`` body over stacked parameters, found from one abstract run.

        Inside its call a scanned module sees each parameter under it without the leading (layer)
        axis it is stored with, and returns ``(carry, ys)`` with the carry shaped like its first
        argument; the second test keeps out an ``nn.vmap``-ed module (experts), which also sees its
        parameters one axis short.
        """
        seen: dict[str, dict[str, tuple]] = {}
        stored: dict[str, tuple] = {}

        def record(call, original):
            out = original()
            if call.path and call.args and _carries(call.args[0], out):
                seen.setdefault(call.path, _shapes(call.module.variables.get("params", {}), call.path))
            return out

        def run(params, args, kwargs):
            dense = _leaves.densify(params)
            stored.update(_shapes(dense, ""))
            _intercept.route(lambda: self.call(dense, args, kwargs), None, record, kinds=(nn.Module,))()
        jax.eval_shape(run, self.params, args, kwargs)
        for path in sorted(seen, key=lambda p: p.count("/")):
            inner, outer = seen[path], {p: s for p, s in stored.items() if _under(p, path)}
            if inner and inner.keys() == outer.keys() and len({s[:1] for s in outer.values()}) == 1 \
                    and all(outer[p][1:] == s for p, s in inner.items()):
                return path
        return None

    def runners(self, blocks: list[Block], args: tuple, kwargs: dict) -> list[tuple[Any, Any]]:
        """``(runner, non-parameter state)`` per block; blocks of one shape share one runner (the body
        of a linen scan runs alone, unscanned, on one layer's parameters)."""
        if blocks[0].whole:
            return [(_ApplyRunner(self.apply), self.extra or {})]
        found = {}

        def grab(call, original):
            found[call.path] = call.module.clone(parent=None, name=None)
            return original()
        jax.eval_shape(lambda p, a, k: self.call(p, a, k, blocks, grab), self.params, args, kwargs)
        return [(_LinenRunner(found[b.path]), self._collections(b)) for b in blocks]

    def _collections(self, block: Block) -> dict[str, Any]:
        """The block's part of every non-parameter collection (batch statistics...) the caller gave."""
        out = {}
        for name, tree in (self.extra or {}).items():
            try:
                out[name] = self.block_params(tree, block)
            except (KeyError, IndexError, TypeError, ValueError):
                continue  # a collection with nothing under this block
        return out


def _routed(fn: Any, blocks: Sequence[Block], handler: Callable | None, kind: type) -> Any:
    """``fn`` with the calls of ``blocks`` going to ``handler(call, original)`` (an ``intercept.Call``)."""
    if not blocks:
        return fn
    paths = {b.path for b in blocks}
    assert handler is not None  # blocks are routed to a handler
    return _intercept.route(fn, lambda path, module: path in paths,
                            handler,
                            kinds=(kind,))


def _carries(x: Any, out: Any) -> bool:
    """Whether ``out`` is a scan body's ``(carry, ys)``, its carry of the structure, shapes, dtypes of ``x``."""
    def spec(tree):
        return jax.tree.map(lambda v: (np.shape(v), jnp.result_type(v)), tree)
    return isinstance(out, tuple) and len(out) == 2 and spec(out[0]) == spec(x)


def _shapes(params: Any, prefix: str) -> dict[str, tuple]:
    """``{path: shape}`` of a parameter tree, its paths under ``prefix``."""
    return {f"{prefix}/{p}" if prefix else p: tuple(np.shape(x))
            for p, x in zip(_tree.paths(params), jax.tree.leaves(params))}


class _Nnx(Model):
    def __init__(self, module: nnx.Module, params: Any):
        # calibrate in eval mode (Dropout off, BatchNorm on its running statistics), on a view: the
        # caller's module keeps its own mode
        module = nnx.view(module, deterministic=True, use_running_average=True, raise_if_not_found=False)
        self.graphdef, state = nnx.split(module)
        self.others = nnx.state(module, lambda path, x: not isinstance(x, nnx.Param))
        self.full = False  # the caller gave the whole state (parameters and other variables)
        if params is None:
            params = nnx.state(module, nnx.Param)
        elif isinstance(params, nnx.State):
            params, others = nnx.split_state(params, nnx.Param, ...)
            if jax.tree.leaves(others):
                self.others, self.full = others, True
        self.params = params
        self.modules = _modules(module)
        self._captures = {}

    def result(self, params: Any) -> Any:
        return nnx.merge_state(params, self.others) if self.full else params

    def call(self, params: Any, args: tuple, kwargs: dict, blocks: Sequence[Block] = (),
             handler: Callable | None = None) -> Any:
        """The model on ``params``; calls of ``blocks`` go to ``handler(call, original)``
        (also the calls of the copies a scan makes of a stacked block)."""
        model = nnx.merge(self.graphdef, params, self.others)
        return _routed(model, blocks, handler, nnx.Module)(*args, **kwargs)

    def stacked(self, args: tuple, kwargs: dict) -> str | None:
        """The top module whose every parameter has one leading axis over a stacked linear's layers."""
        flat = self.flat()
        for path, module in self.modules.items():
            if not isinstance(module, _linear.TARGETS) or f"{path}/kernel" not in flat:
                continue
            kernel = flat[f"{path}/kernel"]
            if len(np.shape(kernel)) <= _unstacked_ndim(module):
                continue
            depth = np.shape(kernel)[0]
            parts = path.split("/")
            for i in range(1, len(parts) + 1):
                top = "/".join(parts[:i])
                under = [x for p, x in flat.items() if _under(p, top)]
                if under and all(np.shape(x)[:1] == (depth,) for x in under):
                    return top
        return None

    def runners(self, blocks: list[Block], args: tuple, kwargs: dict) -> list[tuple[Any, Any]]:
        out = []
        for b in blocks:
            graphdef, _, rest = nnx.split(self.modules[b.path], nnx.Param, ...)  # type: ignore[misc]  # flax types the split as variadic
            if b.index is not None:
                rest = jax.tree.map(operator.itemgetter(b.index), rest)
            out.append((_NnxRunner(graphdef), rest))
        return out


def _modules(model: nnx.Module) -> dict[str, nnx.Module]:
    return {"/".join(str(p) for p in path): m for path, m in nnx.iter_graph(model) if isinstance(m, nnx.Module)}


def _unstacked_ndim(module: Any) -> float:
    if isinstance(module, nnx.Linear):
        return 2
    if isinstance(module, nnx.LinearGeneral):
        return len(module.in_features) + len(module.out_features) + len(getattr(module, "batch_axis", {}) or {})
    if isinstance(module, nnx.Einsum):
        return len(module.kernel_shape)
    return math.inf


def wrap(model_or_apply: Any, params: Any) -> Model:
    """A :class:`Model` for an nnx module, a linen module or a linen apply function."""
    if isinstance(model_or_apply, nnx.Module):
        return _Nnx(model_or_apply, params)
    apply = model_or_apply.apply if isinstance(model_or_apply, nn.Module) else model_or_apply
    if not callable(apply):
        raise TypeError(f"compress needs an nnx module, a linen module or a linen apply function, "
                        f"got {type(model_or_apply).__name__}")
    if isinstance(params, dict) and "params" in params:
        return _Linen(apply, params["params"], {k: v for k, v in params.items() if k != "params"})
    return _Linen(apply, params, None)
