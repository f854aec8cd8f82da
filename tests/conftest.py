"""Fixtures shared by the test files (the 8 CPU devices are set up by the repository's conftest.py)."""

import digits_util as du
import jax
import pytest
from flax import nnx

import jaxopt_big as jb


@pytest.fixture(scope="session")
def digits():
    """(train, test): the stratified 80/20 split of the 8x8 digit images."""
    return du.split()


@pytest.fixture(scope="session")
def digits_flat():
    """(train, test): the same split with each image flattened to 64 features."""
    return du.split(flat=True)


@pytest.fixture(scope="session")
def explicit_mesh():
    """A 2x4 ("data", "model") mesh of the 8 CPU devices with explicit axis types."""
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)


@pytest.fixture(scope="session")
def tiny_llama_config():
    """A two-layer Llama small enough to compress in a second (grouped-query attention: 4 heads, 2 KV heads)."""
    return jb.zoo.LlamaConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                              intermediate_size=64)


@pytest.fixture
def tiny_llama(tiny_llama_config):
    """A fresh ``jb.zoo.Llama`` of ``tiny_llama_config`` (seed 0); function scope, as nnx modules are mutable."""
    return jb.zoo.Llama(tiny_llama_config, rngs=nnx.Rngs(0))
