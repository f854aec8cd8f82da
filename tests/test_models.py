"""jb.models: the linen models give logits, and the nnx models have the linen layout."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import jaxopt_big as jb


@pytest.mark.parametrize("model", [jb.models.MLP(), jb.models.CNN(), jb.models.CNN(batch_norm=True),
                                   jb.models.Transformer()])
def test_linen_models_produce_logits(model):
    x = jnp.zeros((3, 8, 8, 1))
    variables = model.init(jax.random.key(0), x)
    assert model.apply(variables, x).shape == (3, 10)
    assert all(p.endswith(("kernel", "bias", "scale", "pos_embedding")) for p in jb.tree.paths(variables["params"]))


def test_nnx_models_match_linen_layout():
    x = jnp.ones((2, 8, 8, 1))
    assert jb.models.NnxMLP(64, rngs=nnx.Rngs(0))(x).shape == (2, 10)
    assert jb.models.NnxCNN(rngs=nnx.Rngs(0))(x).shape == (2, 10)
    linen = jb.models.CNN().init(jax.random.key(0), x)["params"]
    nnx_state = nnx.state(jb.models.NnxCNN(rngs=nnx.Rngs(0)), nnx.Param)
    assert sorted(x.shape for x in jax.tree.leaves(linen)) == sorted(x.shape for x in jax.tree.leaves(nnx_state))
