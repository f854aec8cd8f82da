"""End to end on digits: pruned / dynamic-sparse MLPs stay close to the dense model's hold-out accuracy."""

import jax
import numpy as np
import optax

from jaxopt_big import sparsity as sp
import digits_util as du

STEPS_PER_EPOCH = len(du.split(flat=True)[0]) // 64


def _sparsity(params) -> float:
    k = [np.asarray(params[n]["kernel"]) for n in sorted(params)]
    return sum(int((x == 0).sum()) for x in k) / sum(x.size for x in k)


def _run(tx, params, epochs, features=(256, 256)):
    model, apply, _, dense_acc = du.dense_mlp(features=features)
    train, test = du.split(flat=True)
    out = du.fit(apply, params, train, epochs=epochs, tx=tx)
    return out, du.accuracy(apply, out, test), dense_acc


def test_global_polynomial_95_percent_within_1pt_of_dense():
    features = (512, 512)  # 95% of its kernels pruned leaves ~15k weights
    _, _, dense_params, _ = du.dense_mlp(features=features)
    steps = 30 * STEPS_PER_EPOCH
    sched = sp.polynomial_schedule(final_sparsity=0.95, begin_step=0, end_step=int(0.4 * steps), update_every=10)
    tx = sp.prune(optax.adam(optax.cosine_decay_schedule(2e-3, steps)), sparsity=sched, update_every=10,
                  scope=sp.Scope.GLOBAL)
    out, acc, dense_acc = _run(tx, dense_params, 30, features)
    print(f"95% global polynomial: {acc:.4f} vs dense {dense_acc:.4f}")
    assert abs(_sparsity(out) - 0.95) < 1e-4
    assert acc >= dense_acc - 0.010


def test_2_of_4_within_half_a_point_of_dense():
    _, _, dense_params, _ = du.dense_mlp()
    steps = 8 * STEPS_PER_EPOCH
    tx = sp.prune(optax.adam(optax.cosine_decay_schedule(1e-3, steps)), sparsity=0.5, structure=sp.NM(2, 4),
                  update_every=steps + 1)
    out, acc, dense_acc = _run(tx, dense_params, 8)
    print(f"2:4: {acc:.4f} vs dense {dense_acc:.4f}")
    k = np.asarray(out["Dense_1"]["kernel"]).reshape(-1, 4, 256)
    assert ((k != 0).sum(1) <= 2).all() and abs(_sparsity(out) - 0.5) < 1e-3
    assert acc >= dense_acc - 0.005


def test_set_and_rigl_at_90_percent_within_1_5pt_of_dense(digits_flat):
    model, _, _, _ = du.dense_mlp()
    train, _ = digits_flat
    epochs = 60
    steps = epochs * STEPS_PER_EPOCH
    for grow in (sp.set_, sp.rigl):
        init = model.init(jax.random.key(0), train.x[:1])["params"]
        tx = grow(optax.adam(optax.cosine_decay_schedule(3e-3, steps)), sparsity=0.9, key=jax.random.key(1),
                  update_every=50, end_step=int(0.75 * steps), distribution=sp.ERK())
        out, acc, dense_acc = _run(tx, init, epochs)
        print(f"{grow.__name__} 90%: {acc:.4f} vs dense {dense_acc:.4f}")
        assert abs(_sparsity(out) - 0.9) < 1e-3
        assert acc >= dense_acc - 0.015, grow.__name__
