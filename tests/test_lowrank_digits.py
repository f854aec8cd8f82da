"""End-to-end on digits: a half-size factorized MLP, and LoRA adapting a model to unseen classes."""

import jax
import numpy as np
import optax

import jaxopt_big as jb
from jaxopt_big import lowrank
import digits_util as du


def test_mlp_factorized_to_half_the_parameters_and_fine_tuned_is_within_1_5_points(digits_flat):
    model, _, params, dense_acc = du.dense_mlp()
    train, test = digits_flat
    hidden = ("Dense_0", "Dense_1")
    low = lowrank.factorize_params(
        params, [jb.tree.Rule(f"{n}/kernel", {"max_params": params[n]["kernel"].size // 2}) for n in hidden])
    for n in hidden:
        kernel = low[n]["kernel"]
        assert kernel.u.size + kernel.v.size <= params[n]["kernel"].size // 2
        assert kernel.nbytes <= params[n]["kernel"].nbytes // 2
    apply = lambda p, x: lowrank.apply(model.apply)({"params": p}, x)
    tuned = du.fit(apply, low, train, epochs=1, lr=3e-4)
    acc = du.accuracy(apply, tuned, test)
    print(f"digits MLP: dense {dense_acc:.4f}, factorized 50% + 1 epoch {acc:.4f}, "
          f"ranks {[low[n]['kernel'].rank for n in hidden]}")
    assert isinstance(tuned["Dense_1"]["kernel"], lowrank.LowRank)
    assert acc >= dense_acc - 0.015


def test_lora_rank_4_adapts_to_unseen_classes_nearly_as_well_as_full_fine_tuning(digits_flat):
    train, test = digits_flat
    old, new = (lambda ds: ds.take(np.flatnonzero(ds.y < 5))), (lambda ds: ds.take(np.flatnonzero(ds.y >= 5)))
    model = jb.models.MLP(features=(512, 512))
    apply = lambda p, x: model.apply({"params": p}, x)
    base = du.fit(apply, model.init(jax.random.key(1), train.x[:1])["params"], old(train), epochs=20)
    assert du.accuracy(apply, base, new(test)) == 0.0  # never saw classes 5-9

    full_acc = du.accuracy(apply, du.fit(apply, base, new(train), epochs=10), new(test))

    lr, epochs = 2e-2, 10
    lora = lowrank.lora_init(base, jax.random.key(3), rank=4, alpha=16.0)
    tx = lowrank.lora_trainable(optax.adam(optax.cosine_decay_schedule(lr, epochs * (len(new(train)) // 64))))
    forward = lambda p, x: lowrank.apply(model.apply)({"params": p}, x)
    tuned = du.fit(forward, lora, new(train), epochs=epochs, tx=tx)
    lora_acc = du.accuracy(forward, tuned, new(test))

    trained = sum(x.size for x in jax.tree.leaves(lowrank.lora_partition(tuned)[0]))
    total = sum(x.size for x in jax.tree.leaves(base))
    print(f"digits LoRA 0-4 -> 5-9: full fine-tune {full_acc:.4f}, LoRA r=4 {lora_acc:.4f} "
          f"({lora_acc / full_acc:.3f} of full), trained {trained}/{total} = {trained / total:.4f}")
    assert trained / total < 0.05
    assert lora_acc >= 0.9 * full_acc
    frozen = jax.tree.leaves(lowrank.lora_partition(tuned)[1])
    assert len(frozen) == len(jax.tree.leaves(base))
    for before, after in zip(jax.tree.leaves(base), frozen):  # same order: LoRA flattens base first
        np.testing.assert_array_equal(np.asarray(after).view(np.uint32), np.asarray(before).view(np.uint32))
