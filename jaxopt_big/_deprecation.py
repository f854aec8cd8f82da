"""Old public names that keep working for one release with a ``DeprecationWarning``."""

from __future__ import annotations

import functools
import warnings
from typing import TypeVar
from collections.abc import Callable

__all__ = ["alias"]

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
