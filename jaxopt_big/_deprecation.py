"""Old public names that keep working for one release with a ``DeprecationWarning``."""

from __future__ import annotations

import functools
import warnings
from typing import Any, TypeVar
from collections.abc import Callable

__all__ = ["alias", "renamed"]

F = TypeVar("F", bound=Callable)


def alias(new: F, old: str, replacement: str) -> F:
    """``new`` under its old name ``old``; every call warns and points at ``replacement``.

    Examples:
      >>> import warnings
      >>> old = alias(abs, "jb.x.old_abs", "jb.x.abs")
      >>> with warnings.catch_warnings(record=True) as seen:
      ...     warnings.simplefilter("always")
      ...     old(-2), str(seen[0].message)
      (2, 'jb.x.old_abs is deprecated and will be removed in the next release; use jb.x.abs')
    """
    @functools.wraps(new)
    def deprecated(*args, **kwargs):
        warnings.warn(f"{old} is deprecated and will be removed in the next release; use {replacement}",
                      DeprecationWarning, stacklevel=2)
        return new(*args, **kwargs)

    deprecated.__name__ = deprecated.__qualname__ = old.rsplit(".", 1)[-1]
    deprecated.__doc__ = f"Deprecated alias of ``{replacement}`` (kept for one release)."
    return deprecated  # type: ignore[return-value]


def renamed(module: str, old_names: dict[str, tuple[Any, str]]) -> Callable[[str], Any]:
    """A module ``__getattr__`` serving each old name as its new object (unwrapped, so a class stays
    the same class for ``isinstance`` and ``==``), warning on every access.

    ``old_names`` maps an old name to ``(new object, replacement to point at)``.

    Examples:
      >>> import warnings
      >>> getattr_ = renamed("jb.x", {"Old": (int, "jb.x.New")})
      >>> with warnings.catch_warnings(record=True) as seen:
      ...     warnings.simplefilter("always")
      ...     getattr_("Old") is int, str(seen[0].message)
      (True, 'jb.x.Old is deprecated and will be removed in the next release; use jb.x.New')
    """
    def __getattr__(name: str) -> Any:
        if name not in old_names:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        new, replacement = old_names[name]
        warnings.warn(f"{module}.{name} is deprecated and will be removed in the next release; use {replacement}",
                      DeprecationWarning, stacklevel=2)
        return new

    return __getattr__
