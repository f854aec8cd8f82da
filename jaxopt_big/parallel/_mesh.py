"""Device meshes with named data / FSDP / tensor axes."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax

from jaxopt_big import _checks

__all__ = ["make_mesh", "AXES"]

AXES = ("data", "fsdp", "tensor")


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, *, explicit: bool = False,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A mesh with axes ``("data", "fsdp", "tensor")`` over ``devices`` (default: all devices).

    Args:
      data, fsdp, tensor: axis sizes; one of them may be ``-1`` to take the remaining devices.
      explicit: ``AxisType.Explicit`` axes (sharding in types) instead of the default ``Auto``.
      devices: the devices to use, all of them by default.

    Raises:
      ValueError: sizes that are not positive (or -1), more than one -1, or a product that does
        not equal the device count.
      TypeError: a size that is not an int, or ``explicit`` that is not a bool.

    Examples:
      >>> mesh = make_mesh(data=-1, fsdp=2)
      >>> dict(mesh.shape)
      {'data': 4, 'fsdp': 2, 'tensor': 1}
    """
    explicit = _checks.flag("make_mesh.explicit", explicit)
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    for name, s in sizes.items():
        if _checks.integer(f"mesh axis {name!r} (an int >= 1, or -1)", s, low=-1) == 0:
            raise ValueError(f"mesh axis {name!r} must be a positive int or -1, got {s!r}")
    free = [n for n, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {free} in {sizes}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if len(devices) % known:
            raise ValueError(f"mesh {sizes}: {len(devices)} devices are not divisible by the fixed axes' "
                             f"product {known}")
        sizes[free[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(f"mesh shape {sizes} has {math.prod(sizes.values())} devices, but {len(devices)} "
                         f"devices are available")
    kind = jax.sharding.AxisType.Explicit if explicit else jax.sharding.AxisType.Auto
    return jax.make_mesh(tuple(sizes.values()), AXES, axis_types=(kind,) * 3, devices=devices)
