"""Digits transfer set: an MLP student with 10% of the labels distils from a CNN teacher on all inputs.

The settings (alpha=0.5, T=4, 10 epochs, adam 2e-3 cosine) were fixed before the first run; the
baseline trains the same student from the same init for the same number of adam steps on the
labeled rows alone. ``benchmarks/distill_transfer.py`` reuses :func:`transfer` and also reports
the full-label case.
"""

import jax
import numpy as np
import optax

import digits_util as du
import jaxopt_big as jb
from jaxopt_big import distill

BATCH = 64


def _train_kd(apply, params, train, labeled, teacher_logits, *, epochs, seed, alpha, temperature):
    loss_fn = distill.combine(optax.softmax_cross_entropy_with_integer_labels, None, student=apply,
                              alpha=alpha, temperature=temperature)
    steps_per_epoch = len(train) // BATCH
    tx = optax.adam(optax.cosine_decay_schedule(2e-3, epochs * steps_per_epoch))
    step = jb.train.make_step(loss_fn, tx)
    state = jb.train.TrainState.create(params, tx)
    for epoch_key in jax.random.split(jax.random.key(seed), epochs):
        order = np.asarray(jax.random.permutation(epoch_key, len(train)))
        for i in range(steps_per_epoch):
            idx = order[i * BATCH:(i + 1) * BATCH]
            batch = distill.Batch(train.x[idx], train.y[idx], labeled=labeled[idx],
                                  teacher=distill.TeacherTargets(teacher_logits[idx], {}))
            state, _ = step(state, batch)
    return state.params


def transfer(seed: int, label_fraction: float, *, epochs: int = 10, alpha: float = 0.5,
             temperature: float = 4.0) -> dict[str, float]:
    """Test accuracy of the MLP student trained on the labeled rows alone vs with KD on all rows."""
    train, test = du.split()
    _, t_apply, t_params, t_acc = du.dense_cnn()
    labeled = np.zeros(len(train), bool)
    labeled[np.random.default_rng(seed).permutation(len(train))[:round(label_fraction * len(train))]] = True
    model = jb.models.MLP()
    init = model.init(jax.random.key(seed), train.x[:1])["params"]
    apply = lambda p, x: model.apply({"params": p}, x)

    only_labeled = train.take(np.flatnonzero(labeled))
    steps = epochs * (len(train) // BATCH)
    base = du.fit(apply, init, only_labeled, epochs=steps // (len(only_labeled) // BATCH), seed=seed)
    targets = distill.precompute(lambda x: t_apply(t_params, x), train.x)
    kd = _train_kd(apply, init, train, labeled, targets.logits, epochs=epochs, seed=seed, alpha=alpha,
                   temperature=temperature)
    return {"baseline": du.accuracy(apply, base, test), "kd": du.accuracy(apply, kd, test),
            "teacher": t_acc}


def test_kd_on_transfer_set_beats_training_on_the_labeled_tenth():
    runs = [transfer(seed, 0.1) for seed in range(3)]
    gains = [100 * (r["kd"] - r["baseline"]) for r in runs]
    print({"runs": runs, "gain_pt": gains})
    assert runs[0]["teacher"] > 0.95
    assert np.mean(gains) >= 2.0, (runs, gains)
