"""Reliability of checkpoints and the command line: no silently wrong restore, no silently lost save,
one-line errors that name what is wrong (issue 16, items 1, 4, 5, 6, 9 and 11)."""

import functools
import pathlib
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxopt_big as jb
from jaxopt_big import cli, demo
from test_leaves import Int8

W = jax.random.normal(jax.random.key(0), (16, 8))


@functools.cache
def _compressed():
    """One leaf of each compressed kind, with non-default static fields (built once: compiles are slow)."""
    return {"q4": jb.quant.quantize(W, jb.quant.QuantSpec(bits=4, granularity=jb.quant.PER_CHANNEL)),
            "qb": jb.quant.quantize(W.astype(jnp.bfloat16), jb.quant.QuantSpec(bits=8, symmetric=False)),
            "sparse": jb.sparsity.pack_array(jnp.where(jnp.abs(W) > 1.0, W, 0.0)),
            "lr": jb.lowrank.factorize(W, rank=4),
            "c": jb.quant.Clustered.from_indices(jnp.linspace(-1.0, 1.0, 8), jnp.arange(128).reshape(16, 8) % 8),
            "qlora": jb.lowrank.lora_init({"kernel": jb.quant.quantize(W, jb.quant.QuantSpec(bits=8))},
                                          jax.random.key(6), rank=2, alpha=4.0,
                                          where=lambda p, x: True)["kernel"],
            "ternary": jb.quant.Ternary().quantize(W),
            "lsq": jb.quant.lsq({"kernel": W}, jb.quant.QuantSpec(bits=3, symmetric=False))["kernel"],
            "mine": Int8.of(W).replace(label="custom"),
            "bias": jnp.ones(8)}


def _saved(tmp_path, tree, step=0, **kwargs):
    with jb.checkpoint.Manager(tmp_path, async_save=False) as mgr:
        assert mgr.save(step, tree, **kwargs)
    return jb.checkpoint.Manager(tmp_path, async_save=False)


# 1. static fields of compressed leaves are saved and checked like array shapes

@pytest.mark.parametrize("name, field, value", [
    ("q4", "dense_shape", (15, 8)),     # int4 packs two rows per byte: (15, 8) has the same stored arrays
    ("q4", "bits", 3),
    ("qb", "dense_dtype", jnp.dtype(jnp.float32)),
    ("sparse", "dense_shape", (8, 16)),
    ("c", "bits", 4),
    ("mine", "label", "other"),
])
def test_restore_refuses_a_target_whose_static_fields_differ(tmp_path, name, field, value):
    tree = _compressed()
    mgr = _saved(tmp_path, tree)
    like = {**tree, name: tree[name].replace(**{field: value})}
    with pytest.raises(ValueError, match=rf"{name}: .*{field}: checkpoint .* vs target {re.escape(repr(value))}"):
        mgr.restore(like=jb.checkpoint.abstract(like))


def test_restore_refuses_a_nested_compressed_leaf_whose_static_fields_differ(tmp_path):
    tree = _compressed()
    mgr = _saved(tmp_path, tree)
    qlora = tree["qlora"]
    like = {**tree, "qlora": qlora.replace(base=qlora.base.replace(dense_shape=(16, 7)))}
    with pytest.raises(ValueError, match=r"qlora: .*base.dense_shape: checkpoint \(16, 8\) vs target \(16, 7\)"):
        mgr.restore(like=like)


def test_restore_without_target_rebuilds_compressed_leaves(tmp_path):
    tree = _compressed()
    back = _saved(tmp_path, tree).restore()
    assert jax.tree.structure(back) == jax.tree.structure(tree)  # classes and static fields included
    for name, leaf in tree.items():
        assert type(back[name]) is type(leaf), name
    chex.assert_trees_all_equal(back, tree)  # the same stored arrays and static fields: the same dense values


def test_restore_without_target_rebuilds_leaves_inside_a_train_state(tmp_path):
    params = {"q": _compressed()["q4"], "b": jnp.zeros(3)}
    state = jb.train.TrainState.create(params, optax.sgd(0.1, momentum=0.9))
    back = _saved(tmp_path, state).restore()
    assert back["params"]["q"].bits == 4 and back["params"]["q"].dense_shape == (16, 8)
    np.testing.assert_array_equal(back["params"]["q"].dense(), params["q"].dense())
    assert type(back["opt_state"][0]["trace"]["q"]) is type(params["q"])  # momentum mirrors the QArray


# 4. `jaxopt-big report DIR` summarises the rebuilt tree and verifies what it reports

def _cli(capsys, *args):
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_report_command_on_a_user_checkpoint_summarises_the_compressed_tree(tmp_path, capsys):
    params = {"Dense_0": {"kernel": jb.quant.quantize(jax.random.normal(jax.random.key(1), (64, 32)),
                                                      jb.quant.QuantSpec(bits=4, granularity=jb.quant.PER_CHANNEL)),
                          "bias": jnp.ones(32)},
              "Dense_1": {"kernel": jb.sparsity.pack_array(jnp.triu(jnp.ones((32, 10)))), "bias": jnp.ones(10)}}
    _saved(tmp_path, params)
    code, out, err = _cli(capsys, "report", str(tmp_path))
    assert code == 0, err
    expected = jb.report.summary(params)
    assert str(expected) in out
    assert f"{expected.totals['params']:,}" in out and expected.totals["params"] == 64 * 32 + 32 + 32 * 10 + 10
    assert "values" not in out  # compressed leaves are rows of their own, not their stored arrays


def test_report_command_on_a_train_state_summarises_its_parameters(tmp_path, capsys):
    params = {"k": jb.quant.quantize(W, jb.quant.QuantSpec(bits=8))}
    _saved(tmp_path, jb.train.TrainState.create(params, optax.adam(1e-3)))
    code, out, err = _cli(capsys, "report", str(tmp_path))
    assert code == 0, err
    assert str(jb.report.summary(params)) in out


def _truncate_state(step_dir: pathlib.Path):
    for f in (step_dir / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "ocdbt" in str(f):
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def test_report_command_with_truncated_state_data_exits_2_in_one_line(tmp_path, capsys):
    params = {"k": jb.quant.quantize(jnp.ones((64, 64)), jb.quant.QuantSpec(bits=8))}
    # as the demo writes it: a stored table next to the state
    _saved(tmp_path, params, extra={"method": "int8", "report": jb.report.summary(params).as_dicts()})
    _truncate_state(tmp_path / "0")
    code, out, err = _cli(capsys, "report", str(tmp_path))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "unreadable" in err and "Traceback" not in err


# 5. a save is done or refused with a reason, never dropped

def test_save_refuses_existing_older_and_negative_steps(tmp_path):
    mgr = _saved(tmp_path, {"w": jnp.zeros(2)}, step=5)
    with pytest.raises(ValueError, match=r"step 5 already exists .*overwrite=True"):
        mgr.save(5, {"w": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"step 3 is older than the latest step 5 .*overwrite=True"):
        mgr.save(3, {"w": jnp.ones(2)}, force=True)
    with pytest.raises(ValueError, match=r"step must be an int >= 0, got -1"):
        mgr.save(-1, {"w": jnp.ones(2)})
    with pytest.raises(TypeError, match=r"step must be an int, got True"):
        mgr.save(True, {"w": jnp.ones(2)})
    assert mgr.all_steps() == [5] and mgr.restore(like={"w": jnp.zeros(2)})["w"].tolist() == [0.0, 0.0]


def test_save_with_overwrite_replaces_the_step_and_drops_later_ones(tmp_path):
    mgr = _saved(tmp_path, {"w": jnp.zeros(2)}, step=2)
    mgr.save(4, {"w": jnp.zeros(2)})
    assert mgr.save(4, {"w": jnp.full(2, 4.0)}, overwrite=True)
    assert mgr.all_steps() == [2, 4] and mgr.restore(4, like={"w": jnp.zeros(2)})["w"].tolist() == [4.0, 4.0]
    assert mgr.save(3, {"w": jnp.full(2, 3.0)}, overwrite=True)  # resume from step 2 and train anew
    assert mgr.all_steps() == [2, 3] and mgr.restore(like={"w": jnp.zeros(2)})["w"].tolist() == [3.0, 3.0]


def test_non_json_extra_is_refused_before_anything_is_written(tmp_path):
    with jb.checkpoint.Manager(tmp_path) as mgr:  # async: a late failure would lose the step silently
        with pytest.raises(TypeError, match=r"extra\['history'\]\[1\]\['loss'\].*float32"):
            mgr.save(1, {"w": jnp.ones(2)}, extra={"history": [{"loss": 1.0}, {"loss": np.float32(0.5)}]})
        assert mgr.all_steps() == []
        assert mgr.save(1, {"w": jnp.ones(2)}, extra={"history": [{"loss": 1.0}]})
        assert mgr.all_steps() == [1] and mgr.extra()["history"] == [{"loss": 1.0}]


def test_save_interval_skips_non_multiples_from_the_first_save(tmp_path):
    with jb.checkpoint.Manager(tmp_path, save_interval_steps=2) as mgr:
        assert [mgr.save(s, {"w": jnp.ones(1)}) for s in (1, 2, 3, 4)] == [False, True, False, True]
        assert mgr.all_steps() == [2, 4]
        assert mgr.save(5, {"w": jnp.ones(1)}, force=True) and mgr.all_steps() == [2, 4, 5]


# 6. the command line checks its output folder first and names what is wrong

def test_demo_checks_its_output_folder_before_training(tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("")
    trained = []
    monkeypatch.setattr(demo, "STAGES", [lambda ctx: trained.append(1)])
    code, out, err = _cli(capsys, "demo", "--quick", "--out", str(tmp_path / "file" / "out"))
    assert code == 2 and not trained
    assert err.count("\n") == 1 and "--out" in err and "Traceback" not in err
    with pytest.raises(OSError):
        demo.run(quick=True, out=tmp_path / "file", stages=[lambda ctx: trained.append(1)])
    assert not trained


def test_report_command_on_a_file_says_it_is_not_a_directory(tmp_path, capsys):
    (tmp_path / "ckpt.bin").write_bytes(b"x")
    code, out, err = _cli(capsys, "report", str(tmp_path / "ckpt.bin"))
    assert code == 2 and err.count("\n") == 1
    assert "is not a directory" in err and "does not exist" not in err


# 9. errors that name what is wrong

def test_step_with_rng_needs_a_loss_that_takes_rng():
    tx = optax.sgd(0.1)
    state = jb.train.TrainState.create({"w": jnp.zeros(2)}, tx, rng=jax.random.key(0))
    step = jb.train.make_step(lambda p, b: ((p["w"] ** 2).sum(), {}), tx)
    with pytest.raises(TypeError, match=r"state carries rng .*loss_fn must accept a rng= keyword"):
        step(state, jnp.ones(2))
    with_stats = jb.train.TrainState.create({"w": jnp.zeros(2)}, tx, batch_stats={"mean": jnp.zeros(2)})
    with pytest.raises(TypeError, match=r"state carries batch_stats .*loss_fn must accept a batch_stats= keyword"):
        step(with_stats, jnp.ones(2))
    takes_kwargs = jb.train.make_step(lambda p, b, **kw: ((p["w"] - jax.random.normal(kw["rng"], (2,))).sum(), {}), tx)
    assert int(takes_kwargs(state, jnp.ones(2))[0].step) == 1


def test_python_scalar_leaves_restore_onto_a_python_scalar_target(tmp_path):
    tree = {"lr": 0.1, "epoch": 3, "w": jnp.ones(2)}
    back = _saved(tmp_path, tree).restore(like=tree)
    assert back["lr"] == 0.1 and back["epoch"] == 3 and back["w"].tolist() == [1.0, 1.0]


def test_deleted_state_metadata_is_reported_as_unreadable(tmp_path):
    tree = {"a": jnp.ones(3), "b": jnp.ones(2)}
    mgr = _saved(tmp_path, tree)
    (tmp_path / "0" / "state" / "_METADATA").unlink()
    with pytest.raises(ValueError, match=r"checkpoint step 0 .* unreadable") as e:
        mgr.restore(like=tree)
    assert "missing from checkpoint" not in str(e.value)


# 11. each branch of the structure check, alone

def test_restore_target_with_a_leaf_missing_from_the_checkpoint(tmp_path):
    mgr = _saved(tmp_path, {"a": jnp.zeros(2)})
    with pytest.raises(ValueError, match=r"missing from checkpoint \['b'\]") as e:
        mgr.restore(like={"a": jnp.zeros(2), "b": jnp.zeros(3)})
    assert "only in checkpoint" not in str(e.value)


def test_restore_target_without_a_leaf_of_the_checkpoint(tmp_path):
    mgr = _saved(tmp_path, {"a": jnp.zeros(2), "b": jnp.zeros(3)})
    with pytest.raises(ValueError, match=r"only in checkpoint \['b'\]") as e:
        mgr.restore(like={"a": jnp.zeros(2)})
    assert "missing from checkpoint" not in str(e.value)


# 12. an nnx.State (the other first-class parameter tree) round-trips, compressed leaves included

def test_nnx_state_restores_with_and_without_a_target(tmp_path):
    state = nnx.state(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
    quantized = jb.quant.quantize_params(state, jb.quant.QuantSpec(bits=8))
    mgr = _saved(tmp_path, state)
    mgr.save(1, quantized)
    for step, tree in [(0, state), (1, quantized)]:
        for like in (tree, jb.checkpoint.abstract(tree)):
            back = mgr.restore(step, like=like)
            assert type(back) is nnx.State
            assert jax.tree.structure(back, is_leaf=jb.leaves.is_compressed) == jax.tree.structure(
                tree, is_leaf=jb.leaves.is_compressed)
            chex.assert_trees_all_equal(back, tree)
    raw = mgr.restore(1)  # without a target: dicts, each Variable's leaf under "value"
    assert isinstance(raw["kernel"]["value"], jb.quant.QArray)
    chex.assert_trees_all_equal(raw["kernel"]["value"], quantized["kernel"].get_value())
    chex.assert_trees_all_equal(raw["bias"]["value"], state["bias"].get_value())
    with pytest.raises(ValueError, match=r"kernel/value: checkpoint \(\(4, 3\), 'float32'\) vs target \(\(4, 2\)"):
        mgr.restore(0, like=nnx.state(nnx.Linear(4, 2, rngs=nnx.Rngs(0))))


# 13. a zero-size array is refused before anything is written

@pytest.mark.parametrize("async_save", [False, True])
def test_zero_size_array_is_refused_before_anything_is_written(tmp_path, async_save):
    with jb.checkpoint.Manager(tmp_path, async_save=async_save) as mgr:
        with pytest.raises(ValueError, match=r"params/e: cannot save a zero-size array \(shape \(0, 3\)\)"):
            mgr.save(1, {"params": {"w": jnp.ones(3), "e": jnp.zeros((0, 3))}})
        for empty in ({}, {"params": {}}, {"opt": None}):  # Orbax left a tmp directory (and a hang at exit)
            with pytest.raises(ValueError, match=re.escape(f"cannot save a state without leaves ({empty!r})")):
                mgr.save(1, empty)
        mgr.wait()
        assert list(tmp_path.iterdir()) == [] and mgr.all_steps() == []
        assert mgr.save(1, {"params": {"w": jnp.ones(3)}}) and mgr.all_steps() == [1]
