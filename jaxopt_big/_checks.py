"""The argument checks every module uses: numbers, ints, fractions, flags, finite arrays.

Scalars are accepted in every form a user may hold them: Python ``int``/``float``, NumPy scalars
(``np.float32(0.3)``, ``np.int64(2)``) and concrete 0-d arrays (NumPy or JAX). Bools are not numbers
here (``True`` as a bit width or a fraction is a mistake). NaN and Inf are rejected unless a check
says otherwise. A check returns the plain Python value, so callers compare and format it freely.

A traced value (inside ``jit``) cannot be checked: checks that allow it (``traced=True``) return it
unchanged; the others raise ``TypeError`` saying the value must be concrete.

Errors name the argument (or leaf path) and the value: ``"sparsity must be in [0, 1), got 1.5"``.
Wrong types raise ``TypeError``, wrong values ``ValueError``.

Non-finite arrays follow one policy in every technique (quantize, fake-quant, factorize, masks,
cluster, one-shot solvers): a concrete array with NaN or Inf raises ``ValueError`` naming the leaf
(:func:`finite`); under a trace the values cannot be inspected, so each technique keeps the damage
where it is (a quantization group with a non-finite value gets a NaN scale, a NaN score is pruned
first) and never lets it change the finite weights of other channels or leaves.

Examples:
  >>> import numpy as np
  >>> fraction("sparsity", np.float32(0.5))
  0.5
  >>> integer("bits", np.int64(4), low=2, high=8)
  4
  >>> integer("bits", True)
  Traceback (most recent call last):
  ...
  TypeError: bits must be an int, got True
  >>> number("temperature", float("inf"), above=0)
  Traceback (most recent call last):
  ...
  ValueError: temperature must be a finite number > 0, got inf
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["is_traced", "scalar", "number", "integer", "fraction", "flag", "finite", "prefix"]


def prefix(path: str) -> str:
    """``"path: "`` for error messages, or nothing when there is no path."""
    return f"{path}: " if path else ""


def is_traced(value: Any) -> bool:
    """True for a value under a JAX trace (its number is not known yet)."""
    return isinstance(value, jax.core.Tracer)


def _python(name: str, value: Any, kind: str, types: type) -> Any:
    """``value`` as the Python scalar it holds, if it is a ``types`` (and not a bool), else ``TypeError``."""
    if is_traced(value):
        raise TypeError(f"{name} must be a concrete {kind} (not traced under jit), got {value!r}")
    if isinstance(value, (np.ndarray, jax.Array)) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, types):
        raise TypeError(f"{name} must be {'an' if kind == 'int' else 'a'} {kind}, got {value!r}")
    return value


def scalar(name: str, value: Any) -> int | float:
    """The Python number a (Python, NumPy or concrete 0-d array) scalar holds; bools are rejected.

    Raises:
      TypeError: not a real number, a bool, an array with ndim > 0, or a traced value.
    """
    v = _python(name, value, "number", numbers.Real)
    return int(v) if isinstance(v, numbers.Integral) else float(v)


def _bounds(low=None, high=None, above=None, below=None) -> str:
    """" in [0, 1)", " >= 1", " > 0", ... for an error message."""
    lo = ((f"[{low}", f" >= {low}") if low is not None
          else (f"({above}", f" > {above}") if above is not None else None)
    hi = ((f"{high}]", f" <= {high}") if high is not None
          else (f"{below})", f" < {below}") if below is not None else None)
    if lo and hi:
        return f" in {lo[0]}, {hi[0]}"
    return (lo or hi or ("", ""))[1]


def number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
           above: float | None = None, below: float | None = None, allow_inf: bool = False,
           traced: bool = False) -> Any:
    """A finite real number within the bounds (``low <= v <= high``, ``above < v < below``).

    ``allow_inf`` admits +-Inf (never NaN); ``traced`` lets a traced value through unchecked.

    Examples:
      >>> number("alpha", 0.5, low=0, high=1)
      0.5
      >>> number("alpha", float("nan"), low=0, high=1)
      Traceback (most recent call last):
      ...
      ValueError: alpha must be a finite number in [0, 1], got nan
    """
    if traced and is_traced(value):
        return value
    v = scalar(name, value)
    ok = not math.isnan(v) and (allow_inf or math.isfinite(v))
    ok = ok and (low is None or v >= low) and (high is None or v <= high)
    ok = ok and (above is None or v > above) and (below is None or v < below)
    if not ok:
        kind = "a number" if allow_inf else "a finite number"
        raise ValueError(f"{name} must be {kind}{_bounds(low, high, above, below)}, got {value!r}")
    return v


def integer(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """An int (Python, NumPy or concrete 0-d integer array; not a bool, not a float) in ``[low, high]``.

    Examples:
      >>> integer("steps", 3.0)
      Traceback (most recent call last):
      ...
      TypeError: steps must be an int, got 3.0
    """
    v = int(_python(name, value, "int", numbers.Integral))
    if (low is not None and v < low) or (high is not None and v > high):
        raise ValueError(f"{name} must be an int{_bounds(low, high)}, got {value!r}")
    return v


def fraction(name: str, value: Any, *, closed: bool = False, open_low: bool = False,
             traced: bool = False) -> Any:
    """A number in ``[0, 1)`` (``closed``: ``[0, 1]``; ``open_low``: excluding 0).

    Examples:
      >>> fraction("sparsity", 1.0)
      Traceback (most recent call last):
      ...
      ValueError: sparsity must be in [0, 1), got 1.0
    """
    if traced and is_traced(value):
        return value
    v = scalar(name, value)
    ok = (0 < v if open_low else 0 <= v) and (v <= 1 if closed else v < 1)  # False for NaN
    if not ok:
        raise ValueError(f"{name} must be in {'(' if open_low else '['}0, 1{']' if closed else ')'}, got {value!r}")
    return v


def store(obj: Any, **checked: Any) -> None:
    """Sets checked (or derived) values on a frozen dataclass, in its ``__post_init__``.

    Options keep the Python numbers their checks return: a NumPy or JAX scalar would leave them
    unhashable (they are static arguments of jitted functions) and their equality elementwise.
    """
    for name, value in checked.items():
        object.__setattr__(obj, name, value)


def flag(name: str, value: Any) -> bool:
    """A bool (Python or NumPy)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


@jax.jit
def _nonfinite_counts(arrays: list[jax.Array]) -> list[jax.Array]:
    return [jnp.sum(~jnp.isfinite(x)) for x in arrays]


def finite(named: Iterable[tuple[str, Any]], what: str = "values") -> None:
    """Raises ``ValueError`` naming the first leaf with NaN or Inf; traced leaves are skipped.

    One device round trip for all leaves. Integer and bool arrays are always finite.

    Examples:
      >>> finite([("a/kernel", jnp.array([1.0, jnp.inf]))], "weights")
      Traceback (most recent call last):
      ...
      ValueError: a/kernel: weights contain NaN or Inf (1 of 2 values)
    """
    named = [(p, x) for p, x in named if not is_traced(x)]
    named = [(p, jnp.asarray(x)) for p, x in named]
    named = [(p, x) for p, x in named if jnp.issubdtype(x.dtype, jnp.inexact) and x.size]
    if not named:
        return
    counts = _nonfinite_counts([x for _, x in named])
    if any(isinstance(c, jax.core.Tracer) for c in counts):
        return  # concrete leaves closed over inside an outer jit: the traced (propagation) policy applies
    for (p, x), c in zip(named, jax.device_get(counts)):
        nonfinite_count(p, c, x.size, what)


def nonfinite_count(path: str, count: Any, size: int, what: str = "values") -> None:
    """Raises ``ValueError`` when a concrete ``count`` of NaN/Inf (out of ``size`` values) is nonzero."""
    if not is_traced(count) and int(count):
        raise ValueError(f"{prefix(path)}{what} contain NaN or Inf ({int(count)} of {size} values)")
