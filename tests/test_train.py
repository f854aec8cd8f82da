"""Training steps, fit options, K-fold splits and cross-validation."""

import chex
import digits_util as du
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxopt_big as jb

MLP = jb.models.MLP(features=(32,))


def _mlp_state(tx, x):
    return jb.train.TrainState.create(MLP.init(jax.random.key(0), x[:1])["params"], tx)


def _digits(n=128):
    train, _ = du.split(flat=True)
    return train.x[:n], train.y[:n]


def test_accumulation_4x32_equals_batch_128():
    x, y = _digits(128)
    tx = optax.sgd(0.5)  # linear in the gradient: a wrong 1/accum_steps would show in full (Adam cancels it)
    loss = jb.train.classifier_loss(lambda p, x: MLP.apply({"params": p}, x))
    big, acc = _mlp_state(tx, x), _mlp_state(tx, x)
    step_big = jb.train.make_step(loss, tx, donate=False)
    step_acc = jb.train.make_step(loss, tx, accum_steps=4, donate=False)
    for _ in range(3):
        big, m_big = step_big(big, (x, y))
        acc, m_acc = step_acc(acc, (x, y))
    chex.assert_trees_all_close(acc.params, big.params, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(m_acc["loss"], m_big["loss"], rtol=1e-6)
    np.testing.assert_allclose(m_acc["accuracy"], m_big["accuracy"], rtol=1e-6)
    with pytest.raises(ValueError, match="leading size 128 is not divisible by accum_steps=3"):
        jb.train.make_step(loss, tx, accum_steps=3)(big, (x, y))


def test_bf16_compute_keeps_float32_master_weights():
    x, y = _digits(64)
    seen = []

    def loss(p, batch):
        seen.append((p["Dense_0"]["kernel"].dtype, batch[0].dtype))
        return jb.train.classifier_loss(lambda p, x: MLP.apply({"params": p}, x))(p, batch)

    tx = optax.adam(1e-2)
    state = _mlp_state(tx, x)
    ref, _ = jb.train.make_step(jb.train.classifier_loss(lambda p, x: MLP.apply({"params": p}, x)), tx,
                                donate=False)(state, (x, y))
    new, metrics = jb.train.make_step(loss, tx, compute_dtype=jnp.bfloat16, donate=False)(state, (x, y))
    assert seen == [(jnp.bfloat16, jnp.bfloat16)]
    assert all(l.dtype == jnp.float32 for l in jax.tree.leaves((new.params, new.opt_state[0].mu)))
    assert metrics["loss"].dtype == jnp.float32
    # adam's first step moves every weight by ~lr * sign(g): bf16 gradients agree with float32 in sign
    agree = [float(jnp.mean(jnp.sign(a - s) == jnp.sign(b - s)))
             for a, b, s in zip(jax.tree.leaves(new.params), jax.tree.leaves(ref.params), jax.tree.leaves(state.params))]
    assert min(agree) > 0.9, agree


def test_batch_norm_statistics_move_into_the_state(digits):
    model = jb.models.CNN(features=(4,), hidden=8, batch_norm=True)
    train, _ = digits
    x, y = train.x[:32], train.y[:32]
    variables = model.init(jax.random.key(0), x[:1])

    def apply(params, stats, x):
        logits, new = model.apply({"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
        return logits, new["batch_stats"]

    tx = optax.sgd(0.1)
    state = jb.train.TrainState.create(variables["params"], tx, batch_stats=variables["batch_stats"])
    step = jb.train.make_step(jb.train.classifier_loss(apply, batch_stats=True), tx, donate=False)
    new, metrics = step(state, (x, y))
    _, expected = apply(variables["params"], variables["batch_stats"], x)
    chex.assert_trees_all_close(new.batch_stats, expected, atol=1e-6)
    assert not np.allclose(new.batch_stats["BatchNorm_0"]["mean"], 0.0)
    assert set(metrics) == {"loss", "accuracy"}
    # accumulation threads the statistics through the microbatches in order
    acc, _ = jb.train.make_step(jb.train.classifier_loss(apply, batch_stats=True), tx, accum_steps=2,
                                donate=False)(state, (x, y))
    _, first = apply(variables["params"], variables["batch_stats"], x[0::2])
    _, second = apply(variables["params"], first, x[1::2])
    chex.assert_trees_all_close(acc.batch_stats, second, atol=1e-6)


def test_extra_args_transform_gets_params_and_no_retrace():
    def update(updates, state, params=None, **extra):  # pulls every weight to zero: needs params
        return jax.tree.map(lambda p: -p, params), state

    tx = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)
    traced = chex.assert_max_traces(lambda p, b: (jnp.sum(p["w"] * b), {"mean_b": b.mean()}), n=1)
    step = jb.train.make_step(traced, tx)
    state = jb.train.TrainState.create({"w": jnp.ones(3)}, tx)
    for i in range(4):  # new data every step, no new trace
        state, metrics = step(state, jnp.full(3, float(i)))
    assert float(jnp.abs(state.params["w"]).sum()) == 0.0 and int(state.step) == 4
    assert float(metrics["mean_b"]) == 3.0
    chex.clear_trace_counter()


def _fit_setup(n=256):
    x, y = _digits(n)
    ds = jb.data.Dataset(x, y)
    apply = lambda p, x: MLP.apply({"params": p}, x)
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)
    return ds, apply, tx, jb.train.make_step(jb.train.classifier_loss(apply), tx)


def test_fit_eval_callbacks_and_plateau():
    ds, apply, tx, step = _fit_setup()
    seen = []
    calls = iter([2.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # improves once, then a plateau
    state, history = jb.train.fit(
        step, _mlp_state(tx, ds.x), ds, epochs=6, batch_size=64, key=jax.random.key(0), progress=False,
        eval_fn=lambda s: {"score": next(calls)}, eval_every=1,
        callbacks=[jb.train.ReduceOnPlateau(monitor="val_score", factor=0.5, patience=2),
                   lambda e, s, r: seen.append((e, int(s.step)))])
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert seen == [(e, 4 * e) for e in range(1, 7)]
    # records show the rate each epoch trained with; no improvement after epoch 2 halves it after 4 and 6
    np.testing.assert_allclose([h["lr"] for h in history], [1e-2] * 4 + [5e-3] * 2, rtol=1e-6)
    np.testing.assert_allclose(state.opt_state.hyperparams["learning_rate"], 2.5e-3, rtol=1e-6)
    assert history[-1]["loss"] < history[0]["loss"]
    assert "memory_bytes_in_use" not in history[0]  # CPU reports no memory statistics
    with pytest.raises(ValueError, match="inject_hyperparams"):
        jb.train.fit(jb.train.make_step(jb.train.classifier_loss(apply), optax.sgd(0.1)),
                     _mlp_state(optax.sgd(0.1), ds.x), ds, epochs=1, batch_size=64, key=jax.random.key(0),
                     eval_fn=lambda s: {"loss": 1.0}, callbacks=[jb.train.ReduceOnPlateau()])
    with pytest.raises(ValueError, match="factor must be in"):
        jb.train.ReduceOnPlateau(factor=2.0)


def test_fit_early_stopping_and_callback_stop():
    ds, _, tx, step = _fit_setup()
    scores = iter([1.0, 0.5, 0.6, 0.7, 0.4, 0.3])
    _, history = jb.train.fit(step, _mlp_state(tx, ds.x), ds, epochs=6, batch_size=64, key=jax.random.key(0),
                              eval_fn=lambda s: {"loss": next(scores)},
                              callbacks=[jb.train.EarlyStopping(monitor="val_loss", patience=2)])
    assert len(history) == 4  # best at epoch 2, two worse epochs
    # evaluated every second epoch: epochs without a validation value do not count against patience
    scores = iter([1.0, 1.1, 1.2, 0.9])
    _, history = jb.train.fit(step, _mlp_state(tx, ds.x), ds, epochs=8, batch_size=64, key=jax.random.key(0),
                              eval_fn=lambda s: {"loss": next(scores)}, eval_every=2,
                              callbacks=[jb.train.EarlyStopping(monitor="val_loss", patience=2)])
    assert len(history) == 6 and "val_loss" not in history[4] and history[5]["val_loss"] == 1.2
    _, history = jb.train.fit(step, _mlp_state(tx, ds.x), ds, epochs=6, batch_size=64, key=jax.random.key(0),
                              callbacks=[lambda e, s, r: e == 3])
    assert len(history) == 3
    with pytest.raises(ValueError, match=r"monitors 'val_acc', a validation metric, but fit has no eval_fn"):
        jb.train.fit(step, _mlp_state(tx, ds.x), ds, epochs=1, batch_size=64, key=jax.random.key(0),
                     callbacks=[jb.train.EarlyStopping(monitor="val_acc")])
    with pytest.raises(ValueError, match=r"monitors 'acc', but the epoch record has only \['accuracy', 'epoch'"):
        jb.train.fit(step, _mlp_state(tx, ds.x), ds, epochs=1, batch_size=64, key=jax.random.key(0),
                     callbacks=[jb.train.EarlyStopping(monitor="acc")])
    with pytest.raises(TypeError, match="a callback is a Callback or a function"):
        jb.train.fit(step, _mlp_state(tx, ds.x), ds, epochs=1, batch_size=64, key=jax.random.key(0), callbacks=[3])


def test_fit_old_early_stopping_and_plateau_arguments_still_work_with_a_warning():
    ds, _, tx, step = _fit_setup()
    scores = iter([1.0, 0.5, 0.6, 0.7, 0.4, 0.3])
    with pytest.warns(DeprecationWarning, match="pass them in callbacks"):
        state, history = jb.train.fit(
            step, _mlp_state(tx, ds.x), ds, epochs=6, batch_size=64, key=jax.random.key(0),
            eval_fn=lambda s: {"loss": next(scores)}, early_stopping=jb.train.EarlyStopping(patience=2),
            plateau=jb.train.ReduceOnPlateau(patience=1))
    assert len(history) == 4  # best at epoch 2; plateau halved the rate after epochs 3 and 4
    np.testing.assert_allclose(state.opt_state.hyperparams["learning_rate"], 2.5e-3, rtol=1e-6)


def test_fit_callback_memory_is_checkpointed_and_resumes(tmp_path):
    ds, _, tx, step = _fit_setup(128)  # two steps per epoch
    scores = [1.0, 0.5, 0.6, 0.7, 0.8, 0.9]

    def run(epochs, mgr):
        return jb.train.fit(step, _mlp_state(tx, ds.x), ds, epochs=epochs, batch_size=64, key=jax.random.key(0),
                            eval_fn=lambda s: {"loss": scores[int(s.step) // 2 - 1]}, checkpoint=mgr,
                            callbacks=[jb.train.EarlyStopping(patience=3)])[1]

    assert len(run(6, None)) == 5  # best 0.5 at epoch 2, three worse epochs
    with jb.checkpoint.Manager(tmp_path / "run") as mgr:
        run(3, mgr)  # "crash" after epoch 3: best 0.5, one worse epoch
    with jb.checkpoint.Manager(tmp_path / "run") as mgr:
        assert len(run(6, mgr)) == 5  # a fresh memory would only stop after epoch 6
    with jb.checkpoint.Manager(tmp_path / "run") as mgr, pytest.raises(ValueError, match="memory of 1 callbacks"):
        jb.train.fit(step, _mlp_state(tx, ds.x), ds, epochs=6, batch_size=64, key=jax.random.key(0), checkpoint=mgr)


def test_fit_device_memory_statistics_when_reported(monkeypatch):
    class Device:
        def memory_stats(self):
            return {"bytes_in_use": 10, "peak_bytes_in_use": 20, "other": 1}

    ds, _, tx, step = _fit_setup(128)
    state = _mlp_state(tx, ds.x)
    monkeypatch.setattr(jax, "local_devices", lambda: [Device()])
    _, history = jb.train.fit(step, state, ds, epochs=1, batch_size=64, key=jax.random.key(0))
    assert history[0]["memory_bytes_in_use"] == 10 and history[0]["memory_peak_bytes_in_use"] == 20


def test_fit_checkpoints_resume_exactly(tmp_path):
    ds, _, tx, step = _fit_setup()
    fit = lambda state, epochs, mgr: jb.train.fit(step, state, ds, epochs=epochs, batch_size=64,
                                                  key=jax.random.key(1), checkpoint=mgr, checkpoint_every=2)
    straight, straight_history = fit(_mlp_state(tx, ds.x), 4, None)
    with jb.checkpoint.Manager(tmp_path / "run") as mgr:
        fit(_mlp_state(tx, ds.x), 2, mgr)  # "crash" after two epochs
    with jb.checkpoint.Manager(tmp_path / "run") as mgr:
        resumed, history = fit(_mlp_state(tx, ds.x), 4, mgr)
        assert mgr.all_steps() == [8, 16]
    chex.assert_trees_all_equal(resumed.params, straight.params)
    assert [h["loss"] for h in history] == [h["loss"] for h in straight_history]


@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(n=st.integers(10, 60), k=st.integers(2, 6), classes=st.integers(1, 4), seed=st.integers(0, 99))
def test_kfold_partitions_and_stratifies(n, k, classes, seed):
    labels = np.random.default_rng(seed).integers(0, classes, n)
    folds = list(jb.train.kfold(n, k, jax.random.key(seed), labels=labels))
    tests = [t for _, t in folds]
    assert sorted(np.concatenate(tests).tolist()) == list(range(n))
    for train, test in folds:
        assert not set(train) & set(test) and len(train) + len(test) == n
    assert max(map(len, tests)) - min(map(len, tests)) <= 1
    for c in range(classes):
        per_fold = [int((labels[t] == c).sum()) for t in tests]
        assert max(per_fold) - min(per_fold) <= 1, (c, per_fold)


def test_cross_validate_digits_k5_and_vmap_equals_sequential(digits_flat):
    train, _ = digits_flat
    ds = jb.data.Dataset(train.x, train.y)
    model = jb.models.MLP(features=(32,))
    init = lambda key: model.init(key, ds.x[:1])["params"]
    apply = lambda p, x: model.apply({"params": p}, x)
    kwargs = dict(k=5, epochs=4, batch_size=64, key=jax.random.key(0))
    cv = jb.train.cross_validate(init, apply, ds, optax.adam(1e-2), **kwargs)
    assert len(cv.folds) == 5 and cv.mean["accuracy"] > 0.9 and 0 < cv.std["accuracy"] < 0.05, str(cv)
    assert "accuracy" in str(cv) and "±" in str(cv)
    together = jb.train.cross_validate(init, apply, ds, optax.adam(1e-2), vmap=True, **kwargs)
    for a, b in zip(cv.folds, together.folds):
        assert abs(a["accuracy"] - b["accuracy"]) <= 1 / 280 and abs(a["loss"] - b["loss"]) < 1e-3
    with pytest.raises(ValueError, match="k must be an int in"):
        list(jb.train.kfold(5, 6, jax.random.key(0)))


def test_training_does_not_delete_the_callers_params():
    params = {"w": jnp.ones((4, 2))}
    tx = optax.sgd(0.1)
    step = jb.train.make_step(lambda p, b: ((p["w"] * b).sum(), {}), tx)
    state, _ = step(jb.train.TrainState.create(params, tx), jnp.ones((4, 2)))
    assert float(params["w"].sum()) == 8.0  # still readable: the donated buffers were the state's own
    np.testing.assert_allclose(state.params["w"], 0.9 * np.ones((4, 2)))


def test_classifier_loss_label_smoothing_matches_numpy():
    logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]], np.float32)
    y = np.array([0, 1])
    loss, aux = jb.train.classifier_loss(lambda p, x: x, label_smoothing=0.3)(None, (jnp.asarray(logits), y))
    targets = np.full((2, 3), 0.3 / 3) + 0.7 * np.eye(3)[y]
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(float(loss), -(targets * logp).sum(-1).mean(), rtol=1e-6)
    assert float(aux["accuracy"]) == 0.5
    with pytest.raises(ValueError, match="label_smoothing"):
        jb.train.classifier_loss(lambda p, x: x, label_smoothing=1.0)


# ---------------------------------------------------------------------------------------------------------
# Argument checks and donation safety of caller-owned arrays

def _tiny():
    params = {"d": {"kernel": jnp.arange(1.0, 9.0).reshape(4, 2)}}
    loss = lambda p, b: (jnp.sum((b @ p["d"]["kernel"]) ** 2), {})
    ds = jb.data.Dataset(np.eye(4, dtype=np.float32), np.arange(4) % 2)
    return params, loss, ds


def test_prune_key_and_state_rng_survive_the_donating_step():
    params, loss, _ = _tiny()
    key = jax.random.key(0)
    tx = jb.sparsity.prune(optax.sgd(0.1), sparsity=0.5, score=jb.sparsity.random, key=key)
    step = jb.train.make_step(loss, tx)
    first, _ = step(jb.train.TrainState.create(params, tx), jnp.ones((4, 4)))
    second, _ = step(jb.train.TrainState.create(params, tx), jnp.ones((4, 4)))  # same inputs, run again
    chex.assert_trees_all_equal(first.params, second.params)
    assert jax.random.key_data(key).tolist() == [0, 0]  # the caller's key is still readable

    rng = jax.random.key(1)
    rng_step = jb.train.make_step(lambda p, b, *, rng: loss(p, b), optax.sgd(0.1))
    for _ in range(2):
        rng_step(jb.train.TrainState.create(params, optax.sgd(0.1), rng=rng), jnp.ones((4, 4)))
    assert jax.random.key_data(rng).tolist() == [0, 1]


@pytest.mark.parametrize("min_lr", [float("nan"), -1e-3, float("inf"), True])
def test_reduce_on_plateau_checks_min_lr(min_lr):
    with pytest.raises((TypeError, ValueError), match="ReduceOnPlateau.min_lr"):
        jb.train.ReduceOnPlateau(min_lr=min_lr)


@pytest.mark.parametrize("kwargs, match", [(dict(factor=1.0), "factor"), (dict(patience=0), "patience"),
                                           (dict(patience=1.5), "patience"), (dict(monitor=3), "monitor")])
def test_reduce_on_plateau_checks_its_other_fields(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=f"ReduceOnPlateau.{match}"):
        jb.train.ReduceOnPlateau(**kwargs)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(batch_size=0), ValueError, "fit.batch_size must be an int >= 1, got 0"),
    (dict(batch_size=True), TypeError, "fit.batch_size must be an int, got True"),
    (dict(epochs=1.5), TypeError, "fit.epochs must be an int, got 1.5"),
    (dict(progress="no"), TypeError, "fit.progress must be a bool, got 'no'"),
])
def test_fit_checks_its_arguments(kwargs, error, match):
    params, loss, ds = _tiny()
    step = jb.train.make_step(loss, optax.sgd(0.1))
    args = dict(epochs=1, batch_size=2, key=jax.random.key(0), progress=False) | kwargs
    with pytest.raises(error, match=match):
        jb.train.fit(step, jb.train.TrainState.create(params, optax.sgd(0.1)), ds, **args)


def test_fit_and_evaluate_say_they_take_a_dataset_not_a_tuple():
    params, loss, ds = _tiny()
    step = jb.train.make_step(loss, optax.sgd(0.1))
    with pytest.raises(TypeError, match=r"fit.train must be a jb.data.Dataset\(x, y\), got tuple"):
        jb.train.fit(step, jb.train.TrainState.create(params, optax.sgd(0.1)), (ds.x, ds.y), epochs=1,
                     batch_size=2, key=jax.random.key(0), progress=False)
    with pytest.raises(TypeError, match="evaluate.ds must be a jb.data.Dataset"):
        jb.train.evaluate(lambda p, x: x, None, (ds.x, ds.y))


def test_evaluate_on_an_empty_dataset_raises():
    _, _, ds = _tiny()
    with pytest.raises(ValueError, match="evaluate.ds is empty"):
        jb.train.evaluate(lambda p, x: x[:, :2], None, ds.take(np.arange(0)))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(epochs=-1), ValueError, "cross_validate.epochs must be an int >= 0, got -1"),
    (dict(epochs=1.5), TypeError, "cross_validate.epochs must be an int, got 1.5"),
    (dict(batch_size=0), ValueError, "cross_validate.batch_size must be an int >= 1, got 0"),
    (dict(batch_size=True), TypeError, "cross_validate.batch_size must be an int, got True"),
    (dict(vmap="yes"), TypeError, "cross_validate.vmap must be a bool"),
    (dict(stratified=1), TypeError, "cross_validate.stratified must be a bool"),
])
def test_cross_validate_checks_its_arguments(kwargs, error, match):
    _, _, ds = _tiny()
    args = dict(k=2, epochs=1, batch_size=1, key=jax.random.key(0)) | kwargs
    with pytest.raises(error, match=match):
        jb.train.cross_validate(lambda key: jnp.zeros((4, 2)), lambda p, x: x @ p, ds, optax.sgd(0.1), **args)


@pytest.mark.parametrize("n, k, error, match", [
    (True, 2, TypeError, "kfold.n must be an int, got True"),
    (10.0, 3, TypeError, "kfold.n must be an int, got 10.0"),
    (1, 2, ValueError, "kfold.n must be an int >= 2, got 1"),
    (10, False, TypeError, "kfold.k must be an int, got False"),
])
def test_kfold_checks_n_and_k(n, k, error, match):
    with pytest.raises(error, match=match):
        list(jb.train.kfold(n, k, jax.random.key(0)))


def test_make_step_says_what_loss_fn_must_return():
    params, loss, _ = _tiny()
    tx = optax.sgd(0.1)
    bare = jb.train.make_step(lambda p, b: loss(p, b)[0], tx)
    with pytest.raises(TypeError, match=r"loss_fn must return \(loss, aux\).*got an array of shape \(\)"):
        bare(jb.train.TrainState.create(params, tx), jnp.ones((4, 4)))
    per_row = jb.train.make_step(lambda p, b: (jnp.sum(b @ p["d"]["kernel"], 1), {}), tx)
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar loss .*got shape \(4,\)"):
        per_row(jb.train.TrainState.create(params, tx), jnp.ones((4, 4)))


@pytest.mark.parametrize("make, match", [
    (lambda: jb.sparsity.prune(optax.sgd(0.1), sparsity=0.5, straight_through="yes"), "straight_through"),
    (lambda: jb.train.make_step(lambda p, b: (jnp.sum(p), {}), optax.sgd(0.1), donate="no"), "make_step.donate"),
    (lambda: jb.parallel.make_mesh(explicit="yes"), "make_mesh.explicit"),
    (lambda: jb.train.classifier_loss(lambda p, x: x, batch_stats="yes"), "classifier_loss.batch_stats"),
])
def test_flags_must_be_bools(make, match):
    with pytest.raises(TypeError, match=f"{match} must be a bool, got '(yes|no)'"):
        make()


def test_evaluate_and_fit_refuse_inputs_and_labels_that_do_not_pair_up():
    ds = jb.data.Dataset(np.ones((10, 3), np.float32), np.arange(7) % 3)
    with pytest.raises(ValueError, match=r"evaluate.ds has 10 inputs \(x\) but 7 labels \(y\)"):
        jb.train.evaluate(lambda p, x: x @ p, jnp.eye(3), ds)
    tx = optax.sgd(0.1)
    step = jb.train.make_step(jb.train.classifier_loss(lambda p, x: x @ p), tx)
    with pytest.raises(ValueError, match=r"fit.train has 10 inputs \(x\) but 7 labels \(y\)"):
        jb.train.fit(step, jb.train.TrainState.create(jnp.eye(3), tx), ds, epochs=1, batch_size=2,
                     key=jax.random.key(0), progress=False)


def test_evaluate_names_a_label_outside_the_classes():
    x = np.eye(4, 3, dtype=np.float32)
    for y, match in [(np.array([0, 1, 5, -1]), r"evaluate.ds.y\[2\] = 5 is not a class of the model's 3 logits "
                                                 r"\(2 labels outside \[0, 3\)\)"),
                     (np.array([0, -1, 1, 2]), r"evaluate.ds.y\[1\] = -1 ")]:
        with pytest.raises(ValueError, match=match):
            jb.train.evaluate(lambda p, x: x @ p, jnp.eye(3), jb.data.Dataset(x, y))
    with pytest.raises(TypeError, match=r"evaluate.ds.y must hold integer class labels, got dtype float32"):
        jb.train.evaluate(lambda p, x: x @ p, jnp.eye(3), jb.data.Dataset(x, np.zeros(4, np.float32)))


def test_half_precision_logits_are_reduced_in_float32():
    rng = np.random.default_rng(0)
    s, t = (jnp.asarray(rng.normal(size=(64, 5)) * 4, jnp.bfloat16) for _ in range(2))
    s32, t32 = (np.asarray(a, np.float64) for a in (s, t))

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    want = 4 * np.mean(np.sum(np.exp(log_softmax(t32 / 2)) * (log_softmax(t32 / 2) - log_softmax(s32 / 2)), -1))
    np.testing.assert_allclose(float(jb.distill.kd_loss(s, t, 2.0)), want, rtol=1e-5)
    y = rng.integers(0, 5, 64)
    got = jb.train.evaluate(lambda p, x: x, None, jb.data.Dataset(s, y))["loss"]
    np.testing.assert_allclose(got, np.mean(-log_softmax(s32)[np.arange(64), y]), rtol=1e-5)
