"""Multi-host start-up: a thin wrapper over ``jax.distributed.initialize``."""

from __future__ import annotations

import os

import jax

__all__ = ["initialize"]

_ENV = {"coordinator_address": "JAXOPT_BIG_COORDINATOR", "num_processes": "JAXOPT_BIG_NUM_PROCESSES",
        "process_id": "JAXOPT_BIG_PROCESS_ID"}


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, cpu_collectives: str | None = "gloo",
               timeout_s: int = 300, **kwargs) -> None:
    """Connects this process to the others (call once, before any other JAX call).

    Arguments left ``None`` come from ``JAXOPT_BIG_COORDINATOR``, ``JAXOPT_BIG_NUM_PROCESSES`` and
    ``JAXOPT_BIG_PROCESS_ID``, and otherwise from JAX's own cluster detection (TPU pods, SLURM,
    ``JAX_COORDINATOR_ADDRESS``...). ``cpu_collectives`` selects the CPU cross-process collectives
    (``"gloo"``; ``None`` keeps JAX's setting), so multi-process runs also work on CPU hosts.
    Extra keyword arguments go to ``jax.distributed.initialize``.

    Raises:
      ValueError: a process id outside ``[0, num_processes)`` or a non-integer environment value.

    Examples:
      >>> initialize.__name__  # multi-process: initialize("10.0.0.1:1234", 2, 0)
      'initialize'
    """
    def env(name, value, cast):
        if value is not None or _ENV[name] not in os.environ:
            return value
        try:
            return cast(os.environ[_ENV[name]])
        except ValueError:
            raise ValueError(f"{_ENV[name]}={os.environ[_ENV[name]]!r} is not a valid {name}") from None

    coordinator_address = env("coordinator_address", coordinator_address, str)
    num_processes = env("num_processes", num_processes, int)
    process_id = env("process_id", process_id, int)
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} must be in [0, num_processes={num_processes})")
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=timeout_s, **kwargs)
