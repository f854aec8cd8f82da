"""Orbax checkpoints: exact resume, cross-mesh restore, compressed leaves, sizes and errors."""

import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxopt_big as jb
from test_leaves import Int8

MODEL = jb.models.MLP(features=(32,), num_classes=4)
X = np.asarray(jax.random.normal(jax.random.key(1), (20, 16, 8)), np.float32)
Y = np.asarray(jax.random.randint(jax.random.key(2), (20, 16), 0, 4), np.int32)
TX = optax.adamw(optax.cosine_decay_schedule(1e-2, 20), weight_decay=1e-2)


def _loss(params, batch, *, rng):  # noisy inputs: the restored PRNG key matters
    x, y = batch
    x = x + 0.1 * jax.random.normal(rng, x.shape)
    logits = MODEL.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), {}


def _state():
    params = MODEL.init(jax.random.key(0), X[0])["params"]
    return jb.train.TrainState.create(params, TX, rng=jax.random.key(7))


def _steps(step, state, start, stop):
    for i in range(start, stop):
        state, _ = step(state, (X[i], Y[i]))
    return state


def _int8(w):
    return Int8.of(w).replace(label="custom")  # a non-default static field must survive the round trip


def test_exact_resume_is_bitwise(tmp_path):
    step = jb.train.make_step(_loss, TX, donate=False)
    straight = _steps(step, _state(), 0, 20)
    with jb.checkpoint.Manager(tmp_path) as mgr:
        mgr.save(10, _steps(step, _state(), 0, 10))
    with jb.checkpoint.Manager(tmp_path) as fresh:  # a new process would see only the directory
        assert fresh.latest_step() == 10
        resumed = fresh.restore(like=jb.checkpoint.abstract(_state()))
    resumed = _steps(step, resumed, 10, 20)
    assert int(resumed.step) == 20
    assert jax.random.key_impl(resumed.rng) == jax.random.key_impl(straight.rng)
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(jax.random.key_data(a) if a.dtype == resumed.rng.dtype else a),
                                      np.asarray(jax.random.key_data(b) if b.dtype == resumed.rng.dtype else b))


def test_restore_onto_another_mesh(tmp_path):
    saved_mesh = jb.parallel.make_mesh(data=4, fsdp=2)
    state = jb.parallel.shard_params(_state().replace(rng=None), saved_mesh)
    assert state.params["Dense_0"]["kernel"].sharding.spec == jax.P(None, "fsdp")
    with jb.checkpoint.Manager(tmp_path) as mgr:
        mgr.save(3, state)
        other = jb.parallel.make_mesh(data=2, tensor=4)
        shardings = jb.parallel.param_shardings(state, other, [jb.tree.Rule("Dense_0/kernel", jax.P(None, "tensor"))])
        restored = mgr.restore(like=jb.checkpoint.abstract(state, shardings))
    kernel = restored.params["Dense_0"]["kernel"]
    assert kernel.sharding.mesh.shape == other.shape and kernel.sharding.spec == jax.P(None, "tensor")
    assert restored.opt_state[0].mu["Dense_0"]["kernel"].sharding.spec == jax.P(None, "tensor")
    chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(state))


def test_compressed_leaves_round_trip(tmp_path):
    w = jax.random.normal(jax.random.key(3), (32, 16))
    params = {"mine": _int8(w),
              "q": jb.quant.quantize(w, jb.quant.QuantSpec(bits=4, granularity=jb.quant.PER_CHANNEL)),
              "lr": jb.lowrank.factorize(w, rank=4),
              "c": jb.quant.cluster({"kernel": w}, 8, key=jax.random.key(4))["kernel"],
              "sparse": jb.sparsity.pack_array(jnp.where(jnp.abs(w) > 1.0, w, 0.0)),
              "lora": jb.lowrank.lora_init({"kernel": w}, jax.random.key(6), rank=2, alpha=4.0)["kernel"],
              "ternary": jb.quant.Ternary().quantize(w),
              "mask": w > 0}
    state = jb.train.TrainState.create(params, optax.identity())
    with jb.checkpoint.Manager(tmp_path, async_save=False) as mgr:
        mgr.save(1, state)
        back = mgr.restore(1, like=jb.checkpoint.abstract(state))
    for name in params:
        assert type(back.params[name]) is type(params[name]), name
    assert back.params["mine"].label == "custom" and back.params["q"].bits == 4
    chex.assert_trees_all_equal(jb.leaves.densify(back.params), jb.leaves.densify(params))
    assert back.params["mask"].dtype == jnp.bool_


@pytest.mark.parametrize("make", [_int8, lambda w: jb.quant.quantize(w, jb.quant.QuantSpec(bits=8))],
                         ids=["test-int8-leaf", "QArray"])
def test_int8_checkpoint_is_much_smaller_on_disk(tmp_path, make):
    keys = jax.random.split(jax.random.key(5), 4)
    dense = {f"l{i}": {"kernel": jax.random.normal(k, (256, 256))} for i, k in enumerate(keys)}
    packed = jax.tree.map(make, dense)
    with jb.checkpoint.Manager(tmp_path) as mgr:
        mgr.save(0, dense)
        mgr.save(1, packed)
    float_bytes = jb.checkpoint.disk_bytes(mgr.step_directory(0))
    int8_bytes = jb.checkpoint.disk_bytes(mgr.step_directory(1))
    assert float_bytes / int8_bytes >= 3.5, (float_bytes, int8_bytes)


def test_async_save_max_to_keep_and_latest_step(tmp_path):
    with jb.checkpoint.Manager(tmp_path, max_to_keep=2, save_interval_steps=2) as mgr:
        assert mgr.latest_step() is None
        saved = [mgr.save(s, {"w": jnp.full(3, float(s))}) for s in range(7)]
        assert saved == [True, False, True, False, True, False, True]
        assert mgr.all_steps() == [4, 6]
        assert mgr.restore(like={"w": jnp.zeros(3)})["w"].tolist() == [6.0] * 3
        mgr.save(7, {"w": jnp.zeros(3)}, extra={"history": [1.5]}, force=True)
        assert mgr.latest_step() == 7 and mgr.extra()["history"] == [1.5]


def test_truncated_or_missing_checkpoint_errors_and_earlier_ones_stay_readable(tmp_path):
    like = {"w": jnp.zeros((64, 64))}
    with jb.checkpoint.Manager(tmp_path, async_save=False) as mgr:
        mgr.save(1, {"w": jnp.ones((64, 64))})
        mgr.save(2, {"w": jnp.full((64, 64), 2.0)})
    for f in pathlib.Path(tmp_path, "2").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "ocdbt" in str(f.relative_to(tmp_path)):
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    mgr = jb.checkpoint.Manager(tmp_path)
    with pytest.raises(ValueError, match=r"checkpoint step 2 .* unreadable .*other steps: \[1\]"):
        mgr.restore(2, like=like)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 5 .*available steps: \[1, 2\]"):
        mgr.restore(5, like=like)
    assert float(mgr.restore(1, like=like)["w"].sum()) == 64 * 64
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        jb.checkpoint.Manager(tmp_path / "empty").restore()


def test_restore_target_that_differs_names_the_difference(tmp_path):
    with jb.checkpoint.Manager(tmp_path, async_save=False) as mgr:
        mgr.save(0, {"a": {"w": jnp.zeros((4, 2))}, "b": jnp.zeros(3)})
        with pytest.raises(ValueError, match=r"missing from checkpoint \['c'\].*only in checkpoint \['b'\]"):
            mgr.restore(like={"a": {"w": jnp.zeros((4, 2))}, "c": jnp.zeros(3)})
        with pytest.raises(ValueError, match=r"a/w: checkpoint \(\(4, 2\), 'float32'\) vs target \(\(4, 3\)"):
            mgr.restore(like={"a": {"w": jnp.zeros((4, 3))}, "b": jnp.zeros(3)})
    with pytest.raises(ValueError, match="max_to_keep"):
        jb.checkpoint.Manager(tmp_path, max_to_keep=0)


@pytest.mark.parametrize("directory, kwargs, match", [
    ("ckpt", {"async_save": "no"}, r"async_save must be a bool, got 'no'"),
    ("ckpt", {"async_save": 1}, r"async_save must be a bool, got 1"),
    (3, {}, r"directory must be a str or os.PathLike, got 3"),
])
def test_manager_options_are_checked(tmp_path, directory, kwargs, match):
    with pytest.raises(TypeError, match=match):
        jb.checkpoint.Manager(tmp_path / directory if isinstance(directory, str) else directory, **kwargs)
