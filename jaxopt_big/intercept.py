"""One mechanism to observe or replace what Flax Dense/DenseGeneral/Conv/Einsum layers compute.

Works for linen (through ``flax.linen.intercept_methods``) and nnx (the selected layer objects are
given an intercepting subclass for the duration of the call). Layers are selected by *module path*:
``Dense_0`` or ``Block_1/Dense_0`` for linen, ``l1`` or ``layers/0`` for nnx.

Every technique that touches activations builds on this module: activation quantization,
factorized execution of ``LowRank`` kernels, distillation feature capture and one-shot calibration.
A layer whose parameters hold compressed leaves runs on their dense value unless a replacement says
otherwise, so compressed models run anywhere an interception is active.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
from flax import nnx

from jaxopt_big import leaves as _leaves
from jaxopt_big import tree as _tree

__all__ = ["Call", "Record", "capture", "replace", "LINEN_LAYERS", "NNX_LAYERS"]

LINEN_LAYERS = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.ConvTranspose, nn.Einsum)
NNX_LAYERS = (nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.ConvTranspose, nnx.Einsum)

# Set while a layer is re-run on substituted parameters, so that run does not intercept itself.
_BYPASS: contextvars.ContextVar[bool] = contextvars.ContextVar("jaxopt_big_intercept_bypass", default=False)
# id(nnx layer) -> handler, for the nnx layers currently intercepted.
_NNX_HANDLERS: contextvars.ContextVar[Mapping[int, Callable]] = contextvars.ContextVar(
    "jaxopt_big_nnx", default=types.MappingProxyType({}))


class Call:
    """One intercepted layer call.

    Attributes:
      path: module path ("Dense_0", "layers/0").
      module: the layer object (bound linen module or nnx module).
      inputs: the layer's first positional argument.
      params: the layer's own parameters, e.g. ``{"kernel": ..., "bias": ...}``; may hold
        compressed leaves (``QArray``, ``LowRank``...).
    """

    def __init__(self, path, module, args, kwargs, params, run):
        self.path, self.module, self.params = path, module, params
        self._args, self._kwargs, self._run = args, kwargs, run

    @property
    def inputs(self) -> jax.Array:
        return self._args[0]

    @property
    def kernel(self) -> Any:
        return self.params.get("kernel")

    def run(self, params: dict | None = None, inputs: jax.Array | None = None, **attrs: Any) -> jax.Array:
        """The layer's own computation, on ``params``/``inputs`` if given (compressed leaves densified).

        ``attrs`` (linen only) change module attributes for this run, e.g. ``features=r`` to run a
        Conv on a kernel with ``r`` output channels; the layer is cloned with them.
        """
        params = self.params if params is None else params
        args = self._args if inputs is None else (inputs, *self._args[1:])
        return self._run(_leaves.densify(params), args, self._kwargs, attrs)


class Record(NamedTuple):
    """What ``capture`` returns per layer call: a pytree, so it leaves ``jax.jit``."""

    inputs: jax.Array
    outputs: jax.Array
    kernel: Any


class _Selector:
    """Module-path selection with the `tree` conventions; remembers what it saw for error messages."""

    def __init__(self, where: str | Sequence[str] | Callable[[str, Any], bool] | None):
        self.where = where
        self.patterns: list[re.Pattern[str]] | None
        if isinstance(where, str):
            where = [where]
        if isinstance(where, (list, tuple)):
            try:
                self.patterns = [re.compile(w) for w in where]
            except re.error as e:
                raise ValueError(f"invalid module-path regex in {self.where!r}: {e}") from None
        elif where is None or callable(where):
            self.patterns = None
        else:
            raise TypeError(f"where must be a regex, a list of regexes or a callable, got {where!r}")
        self.seen: list[str] = []
        self.hit = [False] * len(self.patterns or [])

    def __call__(self, path: str, module: Any) -> bool:
        self.seen.append(path)
        if self.patterns is None:
            return bool(self.where(path, module)) if callable(self.where) else True  # None: every layer
        found = False
        for i, p in enumerate(self.patterns):
            if _tree.matches(p.pattern, path):
                self.hit[i] = found = True
        return found

    def check(self) -> None:
        for p, h in zip(self.patterns or [], self.hit):
            if not h:
                raise _tree.no_match_error("where", p.pattern, sorted(set(self.seen)))


def _linen_run(module: nn.Module):
    def run(params, args, kwargs, attrs):
        token = _BYPASS.set(True)
        try:
            return module.clone(parent=None, **attrs).apply({"params": params}, *args, **kwargs)
        finally:
            _BYPASS.reset(token)
    return run


def _nnx_params(module: nnx.Module) -> dict[str, Any]:
    return {k: v.get_value() for k, v in vars(module).items() if isinstance(v, nnx.Param)}


def _nnx_run(module: nnx.Module, base_call: Callable):
    def run(params, args, kwargs, attrs):
        if attrs:  # nnx modules cannot be mutated inside jax transforms
            raise TypeError(f"Call.run attributes {sorted(attrs)} are supported for linen layers only")
        old = _nnx_params(module)
        token = _BYPASS.set(True)
        try:
            for k, v in params.items():
                getattr(module, k).set_value(v)
            return base_call(module, *args, **kwargs)
        finally:
            for k, v in old.items():
                getattr(module, k).set_value(v)
            _BYPASS.reset(token)
    return run


_SUBCLASSES: dict[type, type] = {}


def _intercepting_class(cls: type) -> type:
    if cls not in _SUBCLASSES:
        def __call__(self, *args, **kwargs):
            handler = _NNX_HANDLERS.get().get(id(self))
            if handler is None or _BYPASS.get():
                return cls.__call__(self, *args, **kwargs)
            return handler(self, args, kwargs)
        _SUBCLASSES[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})
    return _SUBCLASSES[cls]


def _has_compressed(params: dict) -> bool:
    return any(_leaves.is_compressed(x) for x in jax.tree.leaves(params, is_leaf=_leaves.is_compressed))


@contextlib.contextmanager
def _intercepting(target: Any, selector: _Selector, on_call: Callable[[Call, Callable], Any]):
    """Routes every selected layer call to ``on_call(call, original)`` while active."""
    if isinstance(target, nnx.Module):
        swapped, handlers = [], dict(_NNX_HANDLERS.get())
        for key_path, mod in nnx.iter_graph(target):
            if not isinstance(mod, NNX_LAYERS) or id(mod) in handlers:
                continue
            path = "/".join(str(p) for p in key_path)
            if not selector(path, mod):
                continue
            base = type(mod)

            def handler(m, args, kwargs, path=path, base=base):
                call = Call(path, m, args, kwargs, _nnx_params(m), _nnx_run(m, base.__call__))
                return on_call(call, lambda: base.__call__(m, *args, **kwargs))
            handlers[id(mod)] = handler
            swapped.append((mod, base))
            object.__setattr__(mod, "__class__", _intercepting_class(base))
        token = _NNX_HANDLERS.set(handlers)
        try:
            yield
        finally:
            _NNX_HANDLERS.reset(token)
            for mod, base in swapped:
                object.__setattr__(mod, "__class__", base)
    else:
        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            if (_BYPASS.get() or context.method_name != "__call__" or not isinstance(module, LINEN_LAYERS)):
                return next_fun(*args, **kwargs)
            path = "/".join(module.scope.path)
            if not selector(path, module):
                return next_fun(*args, **kwargs)
            params = dict(module.variables.get("params", {}))
            call = Call(path, module, args, kwargs, params, _linen_run(module))
            return on_call(call, lambda: next_fun(*args, **kwargs))
        with nn.intercept_methods(interceptor):
            yield


def _default(call: Call, original: Callable) -> Any:
    return call.run() if _has_compressed(call.params) else original()


def _wrap(fn: Any, where, on_call: Callable[[Call, Callable], Any], collect: Callable[[], Any] | None):
    _Selector(where)  # bad patterns fail here, not at the first call

    def wrapped(*args, **kwargs):
        selector = _Selector(where)
        with _intercepting(fn, selector, on_call):
            out = fn(*args, **kwargs)
        selector.check()
        return out if collect is None else (out, collect())
    return wrapped


def capture(fn: Any, where: str | Sequence[str] | Callable[[str, Any], bool] | None = None):
    """Wraps ``fn`` so that it also returns what the selected layers saw.

    Args:
      fn: a linen apply function (``model.apply``, or any function that calls it) or an nnx module.
      where: pattern(s) on the module path (:mod:`jaxopt_big.tree` semantics: a full match on the
        layer's path or a module path above it, so ``"layer_0"`` selects every layer inside it; each
        must match a called layer) or a callable ``(path, module) -> bool``; ``None`` selects every
        Dense/Conv/Einsum layer.

    Returns:
      A function with ``fn``'s arguments returning ``(outputs, {path: Record(inputs, outputs, kernel)})``.
      A layer called more than once gets ``path``, ``path@1``, ``path@2``...

    Examples:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> model = nn.Sequential([nn.Dense(3), nn.relu, nn.Dense(2)])
      >>> x = jnp.ones((4, 5))
      >>> variables = model.init(jax.random.key(0), x)
      >>> y, seen = jax.jit(capture(model.apply, "layers_2"))(variables, x)
      >>> seen["layers_2"].inputs.shape, seen["layers_2"].outputs.shape
      ((4, 3), (4, 2))
    """
    records: dict[str, Record] = {}

    def on_call(call: Call, original: Callable) -> Any:
        out = _default(call, original)
        key, i = call.path, 0
        while key in records:
            i += 1
            key = f"{call.path}@{i}"
        records[key] = Record(call.inputs, out, call.kernel)
        return out

    def collect():
        result = dict(records)
        records.clear()
        return result

    return _wrap(fn, where, on_call, collect)


def replace(fn: Any, where: str | Sequence[str] | Callable[[str, Any], bool] | None,
            impl: Callable[[Call], Any]):
    """Wraps ``fn`` so that the selected layers compute ``impl(call)`` instead.

    ``impl`` gets a :class:`Call` (path, module, inputs, the layer's own params) and returns the
    layer output; ``call.run(params=..., inputs=...)`` runs the layer's own computation on
    substituted values (for example fake-quantized ones). ``impl`` may return ``NotImplemented``
    to run the layer as usual.

    Examples:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> model = nn.Dense(2)
      >>> x = jnp.ones((1, 3))
      >>> variables = model.init(jax.random.key(0), x)
      >>> doubled = replace(model.apply, None, lambda call: 2 * call.run())
      >>> bool(jnp.allclose(doubled(variables, x), 2 * model.apply(variables, x)))
      True
    """
    def on_call(call: Call, original: Callable) -> Any:
        out = impl(call)
        return _default(call, original) if out is NotImplemented else out

    return _wrap(fn, where, on_call, None)
