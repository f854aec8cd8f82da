"""Doctests in jaxopt_big/ and README.md run with the same 8 CPU devices as tests/."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
