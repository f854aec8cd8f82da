"""One mechanism to observe or replace what Flax Dense/DenseGeneral/Conv/Einsum layers compute.

Works for linen (through ``flax.linen.intercept_methods``) and nnx (the selected layer objects are
given an intercepting subclass for the duration of the call; the copies a scanned stack makes of them
share it). Layers are selected by *module path*: ``Dense_0`` or ``Block_1/Dense_0`` for linen, ``l1``
or ``layers/0`` for nnx; a stacked (scanned) layer by its stack's path, ``layers/mlp/up_proj``.
This is the one place that patches or wraps Flax modules: :func:`capture`, :func:`replace`,
:func:`run_compressed`, ``quant.qat`` and the one-shot engine (:func:`route`) all go through it.

Every technique that touches activations builds on this module: activation quantization,
factorized execution of ``LowRank`` kernels, distillation feature capture and one-shot calibration.

This is also the one place where compressed kernels are executed. A Dense/DenseGeneral/Conv layer
whose kernel has an execution hook (:meth:`jaxopt_big.leaves.Compressed.contract`: ``QArray``,
``LowRank``, ``LoRA``) runs its own computation with the contraction handed to that hook, so the
dense kernel is never built; every other compressed leaf runs on its dense value. This holds
anywhere an interception is active (:func:`run_compressed`, :func:`capture`, :func:`replace`).
"""

import contextlib
import contextvars
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jaxopt_big import leaves as _leaves
from jaxopt_big import tree as _tree

__all__ = ["Call", "Record", "capture", "replace", "route", "run_compressed", "LINEN_LAYERS", "NNX_LAYERS"]

LINEN_LAYERS = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.ConvTranspose, nn.Einsum)
NNX_LAYERS = (nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.ConvTranspose, nnx.Einsum)
_DOT_LAYERS = (nn.Dense, nn.DenseGeneral, nnx.Linear, nnx.LinearGeneral)
_CONV_LAYERS = (nn.Conv, nnx.Conv)

# Set while a layer is re-run on substituted parameters, so that run does not intercept itself.
_BYPASS: contextvars.ContextVar[bool] = contextvars.ContextVar("jaxopt_big_intercept_bypass", default=False)
# intercepting subclass -> handler, for the nnx modules currently intercepted.
_NNX_HANDLERS: contextvars.ContextVar[Mapping[type, Callable]] = contextvars.ContextVar(
    "jaxopt_big_nnx", default=types.MappingProxyType({}))


def _contraction_attr(module: Any) -> str | None:
    """The layer attribute naming its contraction when a kernel's execution hook may stand in for it.

    None for layers that change their kernel before the contraction (a Conv mask), split it (feature
    groups), batch over it, or use a contraction class: those run on the dense kernel.
    """
    if isinstance(module, _DOT_LAYERS):
        attr = "dot_general"
        if getattr(module, "batch_dims", ()) or getattr(module, "batch_axis", None):
            return None
    elif isinstance(module, _CONV_LAYERS):
        attr = "conv_general_dilated"
        if module.feature_group_count != 1 or module.mask is not None:
            return None
    else:
        return None
    return None if getattr(module, f"{attr}_cls", None) is not None else attr


def _one_feature(module: Any) -> dict[str, Any]:
    """Linen attributes that make the layer expect a kernel with one output feature."""
    if isinstance(module, nnx.Module):  # nnx layers do not check kernel shapes; only the bias goes
        return {"bias": None}
    features = module.features
    return {"features": (*features[:-1], 1) if isinstance(features, (tuple, list)) else 1}


class Call:
    """One intercepted layer (or, through :func:`route`, module) call.

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
    def args(self) -> tuple:
        """The call's positional arguments."""
        return self._args

    @property
    def kwargs(self) -> dict[str, Any]:
        """The call's keyword arguments."""
        return self._kwargs

    @property
    def kernel(self) -> Any:
        return self.params.get("kernel")

    @property
    def runs_hooks(self) -> bool:
        """True when a kernel's execution hook can run this layer's contraction (Dense, DenseGeneral
        and Conv layers without batch dims, feature groups or masks)."""
        return _contraction_attr(self.module) is not None

    def run(self, params: dict | None = None, inputs: jax.Array | None = None, **attrs: Any) -> jax.Array:
        """The layer's own computation, on ``params``/``inputs`` if given.

        A kernel with its own execution hook (see :func:`jaxopt_big.leaves.runs_compressed`) runs
        through it where the layer allows (:attr:`runs_hooks`); other compressed leaves are densified.
        ``attrs`` change module attributes for this run, e.g. ``features=r`` to run a linen Conv on a
        kernel with ``r`` output channels (linen layers are cloned with them; nnx layers are seen
        through a proxy with them, never mutated).
        """
        params = self.params if params is None else params
        args = self._args if inputs is None else (inputs, *self._args[1:])
        attr = _contraction_attr(self.module)
        if attr is not None and _leaves.runs_compressed(params.get("kernel")):
            return self._run_hooked(params, args, attrs, attr)
        return self._run(_leaves.densify(params), args, self._kwargs, attrs)

    def _run_hooked(self, params: dict, args: tuple, attrs: dict, attr: str) -> jax.Array:
        """The layer with its contraction handed to ``kernel.contract``, and its bias added after.

        The layer itself sees a one-feature stand-in kernel (so it never builds the dense one) and
        still does everything around the contraction: dtype promotion, padding, dimension numbers.
        """
        kernel, bias = params["kernel"], params.get("bias")
        own = getattr(self.module, attr, None) or (
            lax.dot_general if attr == "dot_general" else lax.conv_general_dilated)

        def hooked(lhs, rhs, *op_args, **op_kwargs):
            dtype = op_kwargs.get("preferred_element_type") or jnp.result_type(lhs, rhs)
            c = _leaves.Contraction(own, op_args, op_kwargs, conv=attr != "dot_general", dtype=dtype)
            y = kernel.contract(lhs, c)
            want = jax.eval_shape(c, lhs, jax.ShapeDtypeStruct(kernel.shape, rhs.dtype)).shape
            if y.shape != want:
                raise ValueError(f"{self.path}: the execution hook of {type(kernel).__name__} returned shape "
                                 f"{y.shape}; the layer's contraction gives {want}")
            return y.astype(dtype)

        stand_in = jnp.zeros((*kernel.shape[:-1], 1), kernel.dtype)
        others = _leaves.densify({k: v for k, v in params.items() if k not in ("kernel", "bias")})
        y = self._run({**others, "kernel": stand_in}, args, self._kwargs,
                      {**attrs, **_one_feature(self.module), "use_bias": False, attr: hooked})
        return y if bias is None else y + _leaves.densify(bias).astype(y.dtype)


class Record(NamedTuple):
    """What ``capture`` returns per layer call: a pytree, so it leaves ``jax.jit``."""

    inputs: jax.Array
    outputs: jax.Array
    kernel: Any


class _Selector:
    """Module-path selection with the `tree` conventions (:class:`jaxopt_big.tree.Patterns`) or a callable."""

    def __init__(self, where: str | Sequence[str] | Callable[[str, Any], bool] | None):
        self.where = where
        self.patterns: _tree.Patterns | None = None
        if isinstance(where, (str, list, tuple)):
            self.patterns = _tree.Patterns(where, what="where")
        elif where is not None and not callable(where):
            raise TypeError(f"where must be a regex, a list of regexes or a callable, got {where!r}")

    def __call__(self, path: str, module: Any) -> bool:
        if self.patterns is not None:
            return self.patterns(path)
        return bool(self.where(path, module)) if callable(self.where) else True  # None: every layer

    def check(self) -> None:
        if self.patterns is not None:
            self.patterns.check()


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


class _Proxy:
    """An nnx layer seen with some attributes replaced, without mutating it (it may be under a trace)."""

    def __init__(self, module: Any, attrs: dict[str, Any]):
        self._module, self._attrs = module, attrs

    def __getattr__(self, name: str) -> Any:
        return self._attrs[name] if name in self._attrs else getattr(self._module, name)


def _nnx_run(module: nnx.Module):
    def run(params, args, kwargs, attrs):
        base = next((c for c in type(module).__mro__ if c in NNX_LAYERS), None)
        if base is None:
            raise TypeError(f"{type(module).__name__} is not a Dense/Conv/Einsum layer: Call.run cannot run it")
        over = {**attrs, **{k: nnx.Param(v) for k, v in params.items()}}
        return base.__call__(_Proxy(module, over), *args, **kwargs)
    return run


# (layer class, module path, nesting depth) -> its intercepting subclass; reused across calls so that a
# model's graphdef (which names the class) stays the same from one intercepted call to the next.
_SUBCLASSES: dict[tuple[type, str, int], type] = {}
_DEPTH: contextvars.ContextVar[int] = contextvars.ContextVar("jaxopt_big_intercept_depth", default=0)


def _intercepting_class(base: type, path: str, depth: int) -> type:
    """A subclass of ``base`` for one selected nnx module: its class, not its identity, says it is selected.

    nnx keeps a module's class in its graphdef, so the copies ``nnx.merge`` makes of a selected module
    (the layers of a scanned stack, rebuilt from a split state on every step of ``jax.lax.scan`` or
    ``nnx.scan``) are of this class too, and route to the same handler.
    """
    key = (base, path, depth)
    if key not in _SUBCLASSES:
        def __call__(self, *args, **kwargs):
            handler = _NNX_HANDLERS.get().get(type(self))
            if handler is None or _BYPASS.get():
                return base.__call__(self, *args, **kwargs)
            return handler(self, args, kwargs)
        _SUBCLASSES[key] = type(base.__name__, (base,), {"__call__": __call__, "__module__": base.__module__,
                                                          "__qualname__": base.__qualname__})
    return _SUBCLASSES[key]


def _nnx_handler(path: str, base: type, on_call: Callable[[Call, Callable], Any]) -> Callable:
    def handler(m, args, kwargs):
        call = Call(path, m, args, kwargs, _nnx_params(m), _nnx_run(m))
        return on_call(call, lambda: base.__call__(m, *args, **kwargs))
    return handler


@contextlib.contextmanager
def _intercepting_nnx(target: nnx.Module, selector: _Selector, on_call: Callable[[Call, Callable], Any],
                      kinds: tuple[type, ...]):
    handlers, swapped = dict(_NNX_HANDLERS.get()), []
    depth = _DEPTH.get()
    for key_path, mod in nnx.iter_graph(target):
        if not isinstance(mod, kinds) or type(mod) in handlers:  # a module an outer interception has
            continue
        path = "/".join(str(p) for p in key_path)
        if not selector(path, mod):
            continue
        base = type(mod)
        sub = _intercepting_class(base, path, depth)
        handlers[sub] = _nnx_handler(path, base, on_call)
        swapped.append((mod, base))
        object.__setattr__(mod, "__class__", sub)
    tokens = _NNX_HANDLERS.set(handlers), _DEPTH.set(depth + 1)
    try:
        yield
    finally:
        _NNX_HANDLERS.reset(tokens[0])
        _DEPTH.reset(tokens[1])
        for mod, base in swapped:
            object.__setattr__(mod, "__class__", base)


@contextlib.contextmanager
def _intercepting_linen(selector: _Selector, on_call: Callable[[Call, Callable], Any], kinds: tuple[type, ...]):
    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if _BYPASS.get() or context.method_name != "__call__" or not isinstance(module, kinds):
            return next_fun(*args, **kwargs)
        path = "/".join(module.scope.path)
        if not selector(path, module):
            return next_fun(*args, **kwargs)
        params = dict(module.variables.get("params", {}))
        call = Call(path, module, args, kwargs, params, _linen_run(module))
        return on_call(call, lambda: next_fun(*args, **kwargs))
    with nn.intercept_methods(interceptor):
        yield


def _intercepting(target: Any, selector: _Selector, on_call: Callable[[Call, Callable], Any],
                  kinds: tuple[type, ...]):
    """Routes every call of a selected module (of one of ``kinds``) to ``on_call(call, original)`` while active.

    This and :func:`_intercepting_class` are the one place where Flax modules are patched or wrapped.
    """
    if isinstance(target, nnx.Module):
        return _intercepting_nnx(target, selector, on_call, kinds)
    return _intercepting_linen(selector, on_call, kinds)


def _default(call: Call, original: Callable) -> Any:
    return call.run() if _leaves.has_compressed(call.params) else original()


def _wrap(fn: Any, where, on_call: Callable[[Call, Callable], Any], collect: Callable[[], Any] | None, *,
          kinds: tuple[type, ...] = LINEN_LAYERS + NNX_LAYERS, python_loops: bool = False):
    _Selector(where)  # bad patterns fail here, not at the first call

    def wrapped(*args, **kwargs):
        selector = _Selector(where)
        try:
            with _intercepting(fn, selector, on_call, kinds), \
                    jax.disable_jit() if python_loops else contextlib.nullcontext():
                out = fn(*args, **kwargs)
            selector.check()
        except BaseException:
            if collect is not None:
                collect()  # drop a failed call's records: the next call reports only its own
            raise
        return out if collect is None else (out, collect())
    return wrapped


def route(fn: Any, where: str | Sequence[str] | Callable[[str, Any], bool] | None,
          on_call: Callable[[Call, Callable[[], Any]], Any], *, kinds: tuple[type, ...] | None = None):
    """Wraps ``fn`` so that every call of a selected module goes to ``on_call(call, original)``.

    The mechanism under :func:`capture`, :func:`replace` and the one-shot engine, for any module:
    ``kinds`` are the module classes that may be selected (default: the Dense/Conv/Einsum layers,
    :data:`LINEN_LAYERS` and :data:`NNX_LAYERS`; ``(nn.Module, nnx.Module)`` for every module).
    ``original()`` runs the call as it would have run. Calls of nnx modules rebuilt from a selected
    one (the layers of a scanned stack) are routed too, under the selected module's path.

    Examples:
      >>> import jax.numpy as jnp, flax.linen as nn
      >>> model = nn.Sequential([nn.Dense(3), nn.relu, nn.Dense(2)])
      >>> variables = model.init(jax.random.key(0), jnp.ones((1, 4)))
      >>> seen = []
      >>> def log(call, original):
      ...     seen.append(call.path)
      ...     return original()
      >>> _ = route(model.apply, None, log, kinds=(nn.Module,))(variables, jnp.ones((1, 4)))
      >>> seen
      ['', 'layers_0', 'layers_2']
    """
    return _wrap(fn, where, on_call, None, kinds=LINEN_LAYERS + NNX_LAYERS if kinds is None else tuple(kinds))


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
      A layer called more than once gets ``path``, ``path@1``, ``path@2``...; so does each layer of a
      scanned stack (``layers/mlp/up_proj@1`` is layer 1's, its ``kernel`` that layer's slice): ``fn``
      runs with ``jax.disable_jit()``, so a scan loops in Python and every record is a value of the
      wrapped call (jit the wrapper to compile the whole).

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

    return _wrap(fn, where, on_call, collect, python_loops=True)


def run_compressed(fn: Any, where: str | Sequence[str] | Callable[[str, Any], bool] | None = None):
    """Wraps ``fn`` so that the selected layers run on the compressed leaves in their parameters.

    Each compressed kernel runs through its execution hook (``x @ u @ v`` for ``LowRank``, an
    integer matmul for ``QArray``...) where the layer allows, else on its dense value. Without this
    (or another interception) a Flax layer cannot take a compressed leaf as its kernel.

    Examples:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> from jaxopt_big import leaves
      >>> from jaxopt_big.lowrank import factorize_params
      >>> model = nn.Dense(4)
      >>> x = jnp.ones((2, 8))
      >>> params = factorize_params(model.init(jax.random.key(0), x)["params"], rank=2)
      >>> y = jax.jit(run_compressed(model.apply))({"params": params}, x)
      >>> bool(jnp.allclose(y, model.apply({"params": leaves.densify(params)}, x), atol=1e-5))
      True
    """
    return replace(fn, where, lambda call: NotImplemented)


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
