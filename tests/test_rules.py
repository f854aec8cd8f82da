"""One rule engine: the same rules select the same leaves in every technique, with one error format."""

import re

import jax
import jax.numpy as jnp
import pytest

import jaxopt_big as jb
from jaxopt_big.tree import Rule

PARAMS = {f"layer_{i}": {"attn": {"kernel": jnp.full((8, 8), 0.1 * (i + 1)) + jnp.eye(8)},
                         "mlp": {"up": {"kernel": jnp.arange(64.0).reshape(8, 8) / 64 + i},
                                 "down": {"kernel": jnp.arange(64.0).reshape(8, 8)[::-1] / 64}},
                         "norm": {"scale": jnp.ones(8)}}
          for i in range(2)}
PATTERNS = [r"layer_\d+/mlp/up", r"layer_1/attn/kernel"]
EXPECTED = {"layer_0/mlp/up/kernel", "layer_1/mlp/up/kernel", "layer_1/attn/kernel"}
MESH = jb.parallel.make_mesh(data=2, fsdp=2, tensor=2)
TENSOR = jax.P(None, "tensor")


def _compressed(kind):
    return lambda x: isinstance(x, kind)


# technique name -> (apply(rules), which leaves it touched, the value each rule carries)
TECHNIQUES = {
    "make_masks": (lambda r: jb.sparsity.make_masks(jb.sparsity.magnitude(PARAMS), r), lambda x: x is not None, 0.5),
    "quantize_params": (lambda r: jb.quant.quantize_params(PARAMS, r), _compressed(jb.quant.QArray),
                        jb.quant.QuantSpec(bits=4)),
    "factorize_params": (lambda r: jb.lowrank.factorize_params(PARAMS, r), _compressed(jb.lowrank.LowRank), {"rank": 2}),
    "lora_init": (lambda r: jb.lowrank.lora_init(PARAMS, jax.random.key(0), rank=r, alpha=1.0),
                  _compressed(jb.lowrank.LoRA), 2),
    "cluster": (lambda r: jb.quant.cluster(PARAMS, r, key=jax.random.key(0), iters=2), _compressed(jb.quant.Clustered), 4),
    "param_shardings": (lambda r: jb.parallel.param_shardings(PARAMS, MESH, r), lambda s: s.spec == TENSOR, TENSOR),
}


@pytest.mark.parametrize("name", list(TECHNIQUES))
def test_the_same_rules_select_the_same_leaves_in_every_technique(name):
    apply, touched, value = TECHNIQUES[name]
    out = apply([Rule(p, value) for p in PATTERNS])
    leaves = jax.tree.leaves(out, is_leaf=lambda x: x is None or jb.leaves.is_compressed(x))
    assert {p for p, x in zip(jb.tree.paths(PARAMS), leaves) if touched(x)} == EXPECTED


@pytest.mark.parametrize("name", list(TECHNIQUES))
def test_a_rule_that_claims_nothing_raises_the_same_error_in_every_technique(name):
    apply, _, value = TECHNIQUES[name]
    with pytest.raises(ValueError) as err:
        apply([Rule(PATTERNS[0], value), Rule("layer_9/mlp", value)])
    assert re.fullmatch(r"\w[\w ]*: pattern 'layer_9/mlp' matches no leaf; available paths: \[[^]]*\]",
                        str(err.value)), str(err.value)
    assert "layer_0/mlp/up/kernel" in str(err.value)


SIBLINGS = {"layer_1": {"mlp": {"kernel": jnp.ones((8, 8))}, "mlp_gate": {"kernel": jnp.ones((8, 8))},
                       "mlp_norm": {"scale": jnp.ones(8)}},
            "layer_10": {"mlp": {"kernel": jnp.ones((8, 8))}}}


def test_a_pattern_matches_whole_path_segments_not_a_longer_sibling():
    """``layer_1/mlp`` is the module ``mlp`` of ``layer_1``: not ``mlp_gate``, ``mlp_norm`` or ``layer_10``."""
    for pattern, path, expected in [("layer_1/mlp", "layer_1/mlp/kernel", True),
                                    ("layer_1/mlp", "layer_1/mlp_gate/kernel", False),
                                    ("layer_1/mlp", "layer_1/mlp_norm/scale", False),
                                    ("layer_1", "layer_10/mlp/kernel", False),
                                    ("mlp", "layer_1/mlp/kernel", False)]:   # anchored at the start too
        assert jb.tree.matches(pattern, path) is expected, (pattern, path)
        assert Rule(pattern, 4).matches(path) is expected, (pattern, path)
    selected = jb.tree.select(SIBLINGS, ["layer_1/mlp", "layer_1"])
    assert {p for p, x in zip(jb.tree.paths(SIBLINGS), jax.tree.leaves(selected)) if x} == {
        "layer_1/mlp/kernel", "layer_1/mlp_gate/kernel", "layer_1/mlp_norm/scale"}
    assert jax.tree.leaves(jb.tree.select(SIBLINGS, "layer_1/mlp")) == [True, False, False, False]
    out = jb.quant.quantize_params(SIBLINGS, [Rule("layer_1/mlp", jb.quant.QuantSpec(bits=4))])
    leaves = jax.tree.leaves(out, is_leaf=jb.leaves.is_compressed)
    assert {p: isinstance(x, jb.quant.QArray) for p, x in zip(jb.tree.paths(SIBLINGS), leaves)} == {
        "layer_1/mlp/kernel": True, "layer_1/mlp_gate/kernel": False, "layer_1/mlp_norm/scale": False,
        "layer_10/mlp/kernel": False}


def test_where_picks_candidates_and_rules_assign_among_them():
    rules = [Rule("layer_0", jb.quant.QuantSpec(bits=4)), Rule(".*", jb.quant.QuantSpec(bits=8))]
    out = jb.quant.quantize_params(PARAMS, rules, where=r".*/mlp/.*")
    bits = {p: x.bits for p, x in zip(jb.tree.paths(out), jax.tree.leaves(out, is_leaf=jb.leaves.is_compressed))
            if isinstance(x, jb.quant.QArray)}
    assert bits == {"layer_0/mlp/down/kernel": 4, "layer_0/mlp/up/kernel": 4,
                    "layer_1/mlp/down/kernel": 8, "layer_1/mlp/up/kernel": 8}


def test_sharding_rules_read_params_paths_and_moments_follow_their_parameter():
    import optax
    state = jb.train.TrainState.create(PARAMS, optax.adam(1e-3))
    sh = jb.parallel.param_shardings(state, MESH, [Rule(p, TENSOR) for p in PATTERNS])
    assert sh.params["layer_1"]["attn"]["kernel"].spec == TENSOR
    assert sh.opt_state[0].mu["layer_1"]["attn"]["kernel"].spec == TENSOR
    assert sh.opt_state[0].nu["layer_0"]["mlp"]["up"]["kernel"].spec == TENSOR
    assert sh.opt_state[0].mu["layer_0"]["attn"]["kernel"].spec != TENSOR  # the FSDP default


def test_qat_weight_rules_match_kernel_paths_like_quantize_params():
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4, name="out")(nn.Dense(8, name="hidden")(x))

    x = jax.random.normal(jax.random.key(0), (2, 8))
    v = Net().init(jax.random.key(1), x)
    rules = [Rule("hidden", jb.quant.QuantSpec(bits=2))]
    ours = jb.quant.qat(Net().apply, weights=rules)(v, x)
    ref = Net().apply({"params": jb.quant.fake_quant_params(v["params"], rules)}, x)
    assert jnp.allclose(ours, ref, atol=1e-5)
    with pytest.raises(ValueError, match=r"^weights: pattern 'nope' matches no leaf; available paths: "
                                         r"\[hidden/kernel, out/kernel\]$"):
        jb.quant.qat(Net().apply, weights=[Rule("nope", jb.quant.QuantSpec())])(v, x)
    a4 = jb.quant.QuantSpec(bits=4)
    by_rule = jb.quant.qat(Net().apply, activations=[Rule("hidden", a4)])(v, x)
    by_where = jb.quant.qat(Net().apply, activations=a4, where="hidden")(v, x)
    assert jnp.allclose(by_rule, by_where) and not jnp.allclose(by_rule, Net().apply(v, x), atol=1e-4)


def test_deprecated_pairs_warn_and_still_work():
    with pytest.warns(DeprecationWarning):
        out = jb.quant.quantize_params(PARAMS, [(r"layer_0/attn/kernel", jb.quant.QuantSpec())])
    assert isinstance(out["layer_0"]["attn"]["kernel"], jb.quant.QArray)


def test_prune_and_rigl_take_per_layer_sparsity_rules():
    import optax
    rules = [Rule("layer_0/mlp", 0.75), Rule("layer_1/attn", 0.5)]
    zeros = jax.tree.map(jnp.zeros_like, PARAMS)
    tx = jb.sparsity.prune(optax.sgd(0.0), sparsity=rules, update_every=1)
    updates, state = tx.update(zeros, tx.init(PARAMS), PARAMS)
    pruned = optax.apply_updates(PARAMS, updates)
    frac = {p: float((x == 0).mean()) for p, x in zip(jb.tree.paths(pruned), jax.tree.leaves(pruned))}
    assert frac["layer_0/mlp/up/kernel"] == frac["layer_0/mlp/down/kernel"] == 0.75
    assert frac["layer_1/attn/kernel"] == 0.5
    assert frac["layer_0/attn/kernel"] == frac["layer_1/mlp/up/kernel"] == 0.0  # unclaimed: not pruned
    assert state.masks["layer_0"]["attn"]["kernel"] is None
    state = jb.sparsity.rigl(optax.sgd(0.1), sparsity=rules, key=jax.random.key(0), end_step=10).init(PARAMS)
    assert int(state.masks["layer_1"]["attn"]["kernel"].sum()) == 32 and state.masks["layer_1"]["mlp"]["up"]["kernel"] is None
