"""W8A8 execution: a QArray that carries its activation format runs int8 x int8 -> int32, equal to numpy."""

import contextlib
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxopt_big as jb
from jaxopt_big.quant import PER_CHANNEL, PER_TOKEN, Group, QuantSpec

A8 = QuantSpec(bits=8, granularity=PER_TOKEN)
W8A8 = QuantSpec(bits=8, granularity=PER_CHANNEL, activations=A8)
TINY = jb.zoo.LlamaConfig(vocab_size=64, hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                          intermediate_size=64)


def _np_w8a8(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Per-token int8 x (absmax / 127) times per-output-channel int8 w, accumulated exactly in int64."""
    sx = np.abs(x).max(axis=-1, keepdims=True).astype(np.float32) / np.float32(127)
    sw = np.abs(w).max(axis=0, keepdims=True).astype(np.float32) / np.float32(127)
    qx = np.clip(np.round(x / sx), -127, 127).astype(np.int64)
    qw = np.clip(np.round(w / sw), -127, 127).astype(np.int64)
    return (qx @ qw).astype(np.float32) * sx * sw


class _Mixed(nn.Module):
    """Two W8A8 layers around a float one."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(48, name="a")(x)
        x = nn.Dense(40, name="f")(jnp.tanh(x))
        return nn.Dense(24, name="b")(x)


def _w8a8_reference(p: dict, x: np.ndarray) -> np.ndarray:
    k = lambda name: np.asarray(p[name]["kernel"], np.float32)  # noqa: E731
    b = lambda name: np.asarray(p[name]["bias"], np.float32)  # noqa: E731
    h = _np_w8a8(x, k("a")) + b("a")
    h = np.tanh(h) @ k("f") + b("f")
    return _np_w8a8(h, k("b")) + b("b")


@pytest.mark.parametrize("use_mesh", [False, True])
def test_w8a8_layers_equal_numpy_for_every_batch_size_jitted_and_on_a_mesh(use_mesh):
    model = _Mixed()
    rng = np.random.default_rng(0)
    params = model.init(jax.random.key(0), jnp.ones((1, 32)))["params"]
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    with jax.set_mesh(mesh) if use_mesh else contextlib.nullcontext():
        placed = params if not use_mesh else jax.tree.map(
            lambda a: jax.device_put(a, jax.NamedSharding(mesh, jax.P(*(None,) * (a.ndim - 1), "model"))), params)
        q = jb.quant.quantize_params(placed, [jb.Rule("a|b", W8A8)])
        assert q["a"]["kernel"].activations == A8 and q["a"]["kernel"].kind == "int8 a8"
        assert not jb.leaves.is_compressed(q["f"]["kernel"])
        run = jax.jit(jb.intercept.run_compressed(model.apply))
        for shape in [(1, 1, 32), (4, 5, 32)]:  # one row is padded to two inside
            x = rng.normal(size=shape).astype(np.float32)
            batch = jax.device_put(x, jax.NamedSharding(mesh, jax.P("data"))) if use_mesh and shape[0] > 1 else x
            got = np.asarray(jax.device_get(run({"params": q}, batch)))
            want = _w8a8_reference(jax.device_get(params), x)
            np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6, err_msg=str(shape))
    # the int8 dot really runs, and the result is W8A8, not the float model
    text = str(jax.make_jaxpr(jb.intercept.run_compressed(model.apply))({"params": q}, x))
    assert text.count("preferred_element_type=int32") == 2
    dense = model.apply({"params": params}, x)
    assert np.abs(np.asarray(dense) - got).max() > 1e-3


def test_w8a8_gradient_is_the_float_layers_and_it_runs_under_qat():
    model = nn.Dense(8)
    x = jax.random.normal(jax.random.key(1), (4, 16))
    params = model.init(jax.random.key(0), x)["params"]
    q = jb.quant.quantize_params(params, W8A8)
    run = jb.intercept.run_compressed(model.apply)
    dense = {"params": jb.leaves.densify(q)}
    g = jax.grad(lambda x: (run({"params": q}, x) ** 2).sum())(x)
    y = run({"params": q}, x)
    want = jax.vjp(lambda x: model.apply(dense, x), x)[1](2 * y)[0]
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6)
    # under qat with int8 per-token activations, the leaf's own quantization of them changes nothing
    np.testing.assert_allclose(jb.quant.qat(model.apply, activations=A8)({"params": q}, x), y, rtol=1e-6)


def test_w4a8_group_kernels_run_one_int32_dot_per_group_equal_to_numpy_and_affine_ones_the_float_path():
    rng = np.random.default_rng(2)
    x, w = rng.normal(size=(6, 80)).astype(np.float32), rng.normal(size=(80, 8)).astype(np.float32)
    model = nn.Dense(8, use_bias=False)
    run = jax.jit(jb.intercept.run_compressed(model.apply))
    sx = np.abs(x).max(axis=-1, keepdims=True) / np.float32(127)
    qx = np.clip(np.round(x / sx), -127, 127)
    # Group(32) on 80 inputs: groups [0, 32), [32, 64) and the shorter [64, 80), int4 codes in [-7, 7]
    q = jb.quant.quantize(w, QuantSpec(bits=4, granularity=Group(32), activations=A8))
    want = np.zeros((6, 8), np.float32)
    for lo, hi in ((0, 32), (32, 64), (64, 80)):
        sw = np.abs(w[lo:hi]).max(axis=0, keepdims=True) / np.float32(7)
        qw = np.clip(np.round(w[lo:hi] / sw), -7, 7)
        want += (qx[:, lo:hi].astype(np.int64) @ qw.astype(np.int64)).astype(np.float32) * sw
    np.testing.assert_allclose(run({"params": {"kernel": q}}, x), want * sx, rtol=1e-5, atol=1e-5)
    assert "preferred_element_type=int32" in str(jax.make_jaxpr(run)({"params": {"kernel": q}}, x))
    q = jb.quant.quantize(w, QuantSpec(bits=8, symmetric=False, granularity=PER_CHANNEL, activations=A8))
    np.testing.assert_allclose(run({"params": {"kernel": q}}, x), qx * sx @ np.asarray(q.dense()), rtol=1e-5, atol=1e-5)


def test_activation_format_survives_a_checkpoint_and_old_records_without_it_still_load(tmp_path):
    tree = {"w8a8": jb.quant.quantize(jnp.ones((8, 4)), W8A8), "w8": jb.quant.quantize(jnp.ones((8, 4)), QuantSpec())}
    with jb.checkpoint.Manager(tmp_path, async_save=False) as mgr:
        mgr.save(0, tree)
        assert mgr.restore(0)["w8a8"].activations == A8 and mgr.restore(0, like=tree)["w8a8"].activations == A8
    # a record written before the field existed: the weight-only leaf has no "activations" entry
    files = [f for f in (tmp_path / "0").rglob("*") if f.is_file() and b'"activations"' in f.read_bytes()]
    assert files
    for f in files:
        data = json.loads(f.read_text())
        for record in data.values():
            if record["keys"] == ["w8"]:
                del record["static"]["activations"]
        f.write_text(json.dumps(data))
    with jb.checkpoint.Manager(tmp_path, async_save=False) as mgr:
        assert mgr.restore(0)["w8"].activations is None
        assert mgr.restore(0, like=tree)["w8"].activations is None


def test_activation_spec_must_be_symmetric_per_token():
    for bad in (QuantSpec(bits=8), QuantSpec(bits=8, symmetric=False, granularity=PER_TOKEN), "int8"):
        with pytest.raises(ValueError, match="QuantSpec.activations must be None or a symmetric QuantSpec"):
            QuantSpec(bits=8, granularity=PER_CHANNEL, activations=bad)


def test_cli_smoothquant_flag_makes_the_int8_preset_smoothquant_w8a8(tmp_path, monkeypatch):
    from jaxopt_big import cli

    seen = []
    monkeypatch.setattr(jb.hf, "model_type", lambda src: "llama")
    monkeypatch.setattr(jb.hf, "compress_checkpoint", lambda src, dst, recipe, **kw: seen.append(recipe))
    argv = ["compress", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--recipe"]
    assert cli.main([*argv, "int8", "--smoothquant"]) == 0 and cli.main([*argv, "int8", "--smoothquant", "0.7"]) == 0
    for recipe, alpha in zip(seen, (0.5, 0.7)):
        q = recipe.rules[1].value.quantizer
        assert isinstance(q, jb.SmoothQuant) and q.alpha == alpha and q.spec == W8A8
    assert cli.main([*argv, "int8"]) == 0 and seen[-1].rules[1].value.quantizer.spec.activations is None
    assert cli.main([*argv, "awq-int4", "--smoothquant"]) == 2  # one migration only
    assert cli.main([*argv, "auto", "--bits", "4.25", "--smoothquant"]) == 2


def test_w8a8_kernels_export_as_int_quantized_from_the_leaves_and_mixed_as_mixed_precision(tmp_path):
    from flax import nnx
    from safetensors.numpy import load_file
    model = jb.zoo.Llama(TINY, rngs=nnx.Rngs(0))
    w8a8 = jb.recipe.preset("w8a8").apply(nnx.state(model, nnx.Param))
    config = jb.export.compressed_tensors(tmp_path / "a", model, w8a8)
    group = config["config_groups"]["group_0"]
    assert config["format"] == group["format"] == "int-quantized" and len(config["config_groups"]) == 1
    assert group["input_activations"] == {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None,
                                          "strategy": "token", "dynamic": True}
    codes = load_file(str(tmp_path / "a" / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"]
    np.testing.assert_array_equal(codes, np.asarray(w8a8["layers"][0]["mlp"]["up_proj"]["kernel"].get_value()
                                                    .int_values()).T)
    mixed = jb.Recipe([jb.Rule(".*/mlp/.*", jb.Plan(quant=W8A8)), jb.Rule(".*/self_attn/.*", jb.Plan(
        quant=QuantSpec(bits=4, granularity=Group(32))))]).apply(nnx.state(model, nnx.Param))
    config = jb.export.compressed_tensors(tmp_path / "m", model, mixed)
    assert config["format"] == "mixed-precision"
    assert sorted(g["format"] for g in config["config_groups"].values()) == ["int-quantized", "pack-quantized"]
    with pytest.raises(ValueError, match=r"layers/0/mlp/down_proj/kernel: the kernel quantizes its inputs as"):
        jb.export.compressed_tensors(tmp_path / "x", model, w8a8, activations=QuantSpec(bits=8, granularity=PER_TOKEN,
                                                                                         narrow=False))


def test_perplexity_of_a_w8a8_decoder_quantizes_its_inputs():
    from flax import nnx
    model = jb.zoo.Llama(TINY, rngs=nnx.Rngs(0))
    params = jb.recipe.preset("w8a8").apply(nnx.state(model, nnx.Param))
    ids = np.random.default_rng(0).integers(0, TINY.vocab_size, (4, 16)).astype(np.int32)
    got = jb.hf._perplexity_by_layer(model, params, ids)
    # reference: the densified model with its inputs fake-quantized per token by qat (another code path)
    nnx.update(model, jb.leaves.densify(params))
    want = jb.data.perplexity(jb.quant.qat(model, activations=A8, where=r"layers/.*"), None, ids)
    weight_only = jb.data.perplexity(model, None, ids)
    assert abs(got - want) < 1e-5 * want and abs(got - weight_only) > 1e-4 * want
