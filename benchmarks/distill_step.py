"""KD training step with cached teacher logits vs the plain student step (same MLP, same batch).

Also times the KD step that runs the CNN teacher inside the step, to show what caching saves.
Run: ``python benchmarks/distill_step.py [--quick]``.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
import optax

import jaxopt_big as jb
from jaxopt_big import distill

from common import interleaved, write

CE = optax.softmax_cross_entropy_with_integer_labels


def _runner(step, state, batch):
    box = [state]

    def run():
        box[0], metrics = step(box[0], batch)
        return metrics["loss"]
    return run


def main(quick: bool) -> None:
    batch_size = 256
    ds = jb.data.digits()
    x, y = ds.x[:batch_size], ds.y[:batch_size]
    student, teacher = jb.models.MLP(), jb.models.CNN()
    s_params = student.init(jax.random.key(0), x[:1])["params"]
    t_params = teacher.init(jax.random.key(1), x[:1])["params"]
    apply = lambda p, x: student.apply({"params": p}, x)
    t_apply = lambda x: teacher.apply({"params": t_params}, x)
    tx = optax.adam(1e-3)
    fresh = lambda: jb.train.TrainState.create(jax.tree.map(np.array, s_params), tx)

    cached = distill.precompute(t_apply, x)
    kd = dict(alpha=0.5, temperature=4.0)
    fns = {
        "plain": _runner(jb.train.make_step(jb.train.classifier_loss(apply), tx), fresh(), (x, y)),
        "kd_cached": _runner(jb.train.make_step(distill.combine(CE, None, student=apply, **kd), tx), fresh(),
                             distill.Batch(x, y, teacher=cached)),
        "kd_teacher_in_step": _runner(jb.train.make_step(distill.combine(CE, t_apply, student=apply, **kd), tx),
                                      fresh(), (x, y)),
    }
    times = interleaved(fns, repeats=30 if quick else 200, warmup=3)
    ratio = times["kd_cached"] / times["plain"]
    write("distill_step", ours=times["kd_cached"], baseline=times["plain"], goal="kd_cached / plain <= 1.1",
          holds=ratio <= 1.1,
          details={"batch": batch_size, "student": "MLP(128,128)", "teacher": "CNN(32,64)",
                   "kd_teacher_in_step_s": times["kd_teacher_in_step"],
                   "teacher_in_step / plain": round(times["kd_teacher_in_step"] / times["plain"], 3),
                   "quick": quick})


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    main(parser.parse_args().quick)
