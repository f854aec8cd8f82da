"""The end-to-end demo: train on digits, compress every way the library supports, report.

Each stage is a function ``stage(ctx) -> Result`` that starts from the trained dense teacher (or its
own model), applies one technique through the public API and measures hold-out accuracy, true bytes
and training time. ``run`` executes the stages, prints one table, saves each compressed model with
Orbax and writes ``report.md`` and ``accuracy_vs_compression.png``.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxopt_big import data as _data
from jaxopt_big import leaves as _leaves
from jaxopt_big import models as _models
from jaxopt_big import report as _report
from jaxopt_big import train as _train
from jaxopt_big.tree import Rule

__all__ = ["Result", "Context", "run", "STAGES"]


@dataclasses.dataclass(frozen=True)
class Result:
    """One row of the demo table."""

    method: str
    accuracy: float
    nbytes: int
    seconds: float
    params: Any = None  # what gets saved (compressed leaves stay compressed)
    note: str = ""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # numbers behind the note (JSON values)


@dataclasses.dataclass
class Context:
    """What every stage starts from: the data split, the trained teacher and the run settings."""

    train: _data.Dataset
    test: _data.Dataset
    quick: bool
    seed: int
    model: Any = None
    params: Any = None
    accuracy: float = 0.0
    dense_bytes: int = 0

    def apply(self, params: Any, x: jax.Array) -> jax.Array:
        return self.model.apply({"params": params}, x)

    def key(self, i: int) -> jax.Array:
        return jax.random.fold_in(jax.random.key(self.seed), i)

    def epochs(self, full: int) -> int:
        return max(1, full // 2) if self.quick else full


def _adamw(lr: float, steps: int) -> optax.GradientTransformation:
    """AdamW with a 10% linear warm-up and cosine decay over ``steps``: every stage's optimizer."""
    return optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 10, 1), steps), weight_decay=1e-4)


def train_classifier(ctx: Context, params: Any, *, epochs: int, lr: float, apply: Callable | None = None,
                     loss_fn: Callable | None = None, tx: optax.GradientTransformation | None = None,
                     data: _data.Dataset | None = None, desc: str = "train", key_index: int = 0):
    """AdamW with warm-up cosine decay (or ``tx``) on the smoothed loss; returns (params, seconds)."""
    data = ctx.train if data is None else data
    apply = ctx.apply if apply is None else apply
    tx = _adamw(lr, max(epochs * (len(data) // 64), 1)) if tx is None else tx
    step = _train.make_step(loss_fn or _train.classifier_loss(apply, label_smoothing=0.1), tx)
    start = time.perf_counter()
    state, _ = _train.fit(step, _train.TrainState.create(params, tx), data, epochs=epochs, batch_size=64,
                          key=ctx.key(key_index), desc=desc)
    jax.block_until_ready(state.params)
    return state.params, time.perf_counter() - start


def accuracy(ctx: Context, params: Any, apply: Callable | None = None) -> float:
    return _train.evaluate(apply or ctx.apply, params, ctx.test)["accuracy"]


def dense(ctx: Context) -> Result:
    ctx.model = _models.CNN()
    params = ctx.model.init(ctx.key(0), ctx.train.x[:1])["params"]
    ctx.params, seconds = train_classifier(ctx, params, epochs=ctx.epochs(20), lr=3e-3, desc="dense CNN")
    ctx.accuracy = accuracy(ctx, ctx.params)
    ctx.dense_bytes = _leaves.nbytes(ctx.params)
    return Result("dense CNN (teacher)", ctx.accuracy, ctx.dense_bytes, seconds, ctx.params)


def _quantized_accuracy(ctx: Context, qparams: Any, **qat_kwargs) -> float:
    from jaxopt_big import quant
    run = quant.qat(ctx.model.apply, **qat_kwargs)
    return accuracy(ctx, qparams, lambda p, x: run({"params": p}, x))


def int8_ptq(ctx: Context) -> Result:
    from jaxopt_big import quant
    start = time.perf_counter()
    qparams = quant.quantize_params(ctx.params, quant.QuantSpec(bits=8, granularity=quant.PER_CHANNEL))
    calib = [({"params": qparams}, b.x) for b in _data.batches(ctx.train, 128)][:8]
    scales = quant.calibrate_activations(ctx.model.apply, calib, quant.QuantSpec(bits=8))
    seconds = time.perf_counter() - start
    acc = _quantized_accuracy(ctx, qparams, activations=quant.QuantSpec(bits=8), scales=scales)
    return Result("int8 PTQ (weights + static activations)", acc, _leaves.nbytes(qparams), seconds, qparams)


def _two_bit(calibration) -> Any:
    from jaxopt_big import quant
    return quant.QuantSpec(bits=2, granularity=quant.PER_CHANNEL, calibration=calibration)


def two_bit_ptq(ctx: Context) -> Result:
    from jaxopt_big import quant
    start = time.perf_counter()
    qparams = quant.quantize_params(ctx.params, _two_bit(quant.MSE()))
    seconds = time.perf_counter() - start
    absmax = accuracy(ctx, _leaves.densify(quant.quantize_params(ctx.params, _two_bit(quant.AbsMax()))))
    return Result("2-bit PTQ (MSE calibration)", _quantized_accuracy(ctx, qparams), _leaves.nbytes(qparams), seconds,
                  qparams, note=f"absmax calibration: {absmax:.4f}", extra={"absmax_accuracy": absmax})


def two_bit_qat(ctx: Context) -> Result:
    from jaxopt_big import quant
    spec = _two_bit(quant.AbsMax())
    run = quant.qat(ctx.model.apply, weights=spec)
    apply = lambda p, x: run({"params": p}, x)
    params, seconds = train_classifier(ctx, ctx.params, epochs=ctx.epochs(8), lr=1e-3, apply=apply, desc="2-bit QAT")
    qparams = quant.quantize_params(params, spec)
    return Result("2-bit QAT (weights)", _quantized_accuracy(ctx, qparams), _leaves.nbytes(qparams), seconds, qparams)


def weight_sharing(ctx: Context) -> Result:
    from jaxopt_big import quant
    from jaxopt_big.quant._cluster import cluster
    start = time.perf_counter()
    clustered = cluster(ctx.params, 8, key=ctx.key(8))
    seconds = time.perf_counter() - start
    apply = lambda books, x: ctx.apply(_leaves.densify(quant.with_codebooks(clustered, books)), x)
    books, tuned = train_classifier(ctx, quant.codebooks(clustered), epochs=ctx.epochs(4), lr=3e-4, apply=apply,
                                    desc="centroid fine-tune")
    clustered = quant.with_codebooks(clustered, books)
    return Result("8-cluster weight sharing + centroid fine-tune", accuracy(ctx, _leaves.densify(clustered)),
                  _leaves.nbytes(clustered), seconds + tuned, clustered)


def mixed_precision(ctx: Context) -> Result:
    from jaxopt_big import quant
    from jaxopt_big.quant import _mixed as mixed
    start = time.perf_counter()
    spec = quant.QuantSpec(bits=8, granularity=quant.PER_CHANNEL, calibration=quant.MSE())
    calib = next(_data.batches(ctx.train, 512, key=ctx.key(9)))
    sens = mixed.sensitivity(_train.classifier_loss(ctx.apply), ctx.params, (calib.x, calib.y),
                             bits=(2, 4, 8), spec=spec)
    sizes = mixed.layer_bytes(ctx.params, bits=(2, 4, 8), spec=spec)
    budget = int(1.25 * sum(s[2] for s in sizes.values()))
    bits = mixed.allocate_bits(sens, sizes, budget)
    qparams = quant.quantize_params(ctx.params, mixed.allocation_rules(bits, spec))
    seconds = time.perf_counter() - start
    note = ", ".join(f"{p.split('/')[0]}:{b}" for p, b in bits.items())
    return Result("mixed precision (2/4/8 bits, 1.25x 2-bit bytes)", _quantized_accuracy(ctx, qparams),
                  _leaves.nbytes(qparams), seconds, qparams, note=note)


def low_rank(ctx: Context) -> Result:
    from jaxopt_big import lowrank
    kernel = ctx.params["Dense_0"]["kernel"]
    factored = lowrank.factorize_params(ctx.params, [Rule("Dense_0/kernel", {"max_params": kernel.size // 2})])
    run = lowrank.apply(ctx.model.apply)
    apply = lambda p, x: run({"params": p}, x)
    params, seconds = train_classifier(ctx, factored, epochs=ctx.epochs(4), lr=1e-3, apply=apply,
                                       desc="low-rank fine-tune")
    return Result("low-rank 50% of Dense_0 + fine-tune", accuracy(ctx, params, apply), _leaves.nbytes(params),
                  seconds, params)


def lora_adaptation(ctx: Context) -> Result:
    """A CNN trained on digits 0-4 adapted to digits 5-9 by rank-4 LoRA, against full fine-tuning."""
    from jaxopt_big import lowrank
    old, new = (ctx.train.take(ctx.train.y < 5), ctx.train.take(ctx.train.y >= 5))
    new_test = ctx.test.take(ctx.test.y >= 5)
    base = ctx.model.init(ctx.key(10), ctx.train.x[:1])["params"]
    base, _ = train_classifier(ctx, base, epochs=ctx.epochs(15), lr=3e-3, data=old, desc="base on 0-4")
    adapted = lowrank.lora_init(base, ctx.key(11), rank=4, alpha=16.0)
    run = lowrank.apply(ctx.model.apply)
    apply = lambda p, x: run({"params": p}, x)
    tx = lowrank.lora_trainable(optax.adam(optax.cosine_decay_schedule(1e-2, _steps(ctx, ctx.epochs(15)) // 2)))
    adapted, seconds = train_classifier(ctx, adapted, epochs=ctx.epochs(15), lr=3e-3, apply=apply, tx=tx, data=new,
                                        desc="LoRA on 5-9")
    full, _ = train_classifier(ctx, base, epochs=ctx.epochs(15), lr=1e-3, data=new, desc="full fine-tune 5-9")
    lora_acc = _train.evaluate(apply, adapted, new_test)["accuracy"]
    full_acc = _train.evaluate(ctx.apply, full, new_test)["accuracy"]
    adapters, _ = lowrank.lora_partition(adapted)
    trained = sum(x.size for x in jax.tree.leaves(adapters)) / sum(x.size for x in jax.tree.leaves(base))
    return Result("LoRA r=4 adapters (0-4 -> 5-9)", lora_acc, _leaves.nbytes(adapters), seconds, adapted,
                  note=f"accuracy on 5-9; full fine-tune {full_acc:.4f}; trains {100 * trained:.1f}% of params; "
                       "bytes = adapters", extra={"full_finetune_accuracy": full_acc, "trained_fraction": trained})


def _transfer_set(ctx: Context) -> tuple[_data.Dataset, _data.Dataset]:
    """10% of the training labels; the other rows keep their inputs with label -1 (unlabeled)."""
    import numpy as np
    rng = np.random.default_rng(ctx.seed)
    labeled = np.zeros(len(ctx.train), bool)
    labeled[rng.permutation(len(ctx.train))[: len(ctx.train) // 10]] = True
    y = np.where(labeled, ctx.train.y, -1).astype(np.int32)
    return _data.Dataset(ctx.train.x, y), ctx.train.take(labeled)


def _student(ctx: Context):
    model = _models.MLP(features=(128, 128))
    return model, model.init(ctx.key(12), ctx.train.x[:1])["params"], lambda p, x: model.apply({"params": p}, x)


def kd_student(ctx: Context) -> Result:
    from jaxopt_big import distill
    transfer, _ = _transfer_set(ctx)
    _, params, apply = _student(ctx)
    teacher = lambda x: ctx.apply(ctx.params, x)
    kd = distill.combine(optax.softmax_cross_entropy_with_integer_labels, teacher, student=apply, alpha=0.5,
                         temperature=4.0)
    loss_fn = lambda p, b: kd(p, distill.Batch(x=b[0], y=jnp.maximum(b[1], 0), labeled=b[1] >= 0))
    params, seconds = train_classifier(ctx, params, epochs=ctx.epochs(40), lr=2e-3, apply=apply, loss_fn=loss_fn,
                                       data=transfer, desc="KD student")
    return Result("KD MLP student (10% labels + teacher)", accuracy(ctx, params, apply), _leaves.nbytes(params),
                  seconds, params)


def plain_student(ctx: Context) -> Result:
    _, labeled = _transfer_set(ctx)
    _, params, apply = _student(ctx)
    # Same optimizer, steps and (unsmoothed) cross-entropy as the KD student's task term.
    params, seconds = train_classifier(ctx, params, epochs=10 * ctx.epochs(40), lr=2e-3, apply=apply, data=labeled,
                                       loss_fn=_train.classifier_loss(apply), desc="plain student")
    return Result("plain MLP student (10% labels)", accuracy(ctx, params, apply), _leaves.nbytes(params), seconds,
                  params, note="same optimizer, steps and cross-entropy as the KD student")


def _steps(ctx: Context, epochs: int) -> int:
    return epochs * (len(ctx.train) // 64)


def _pruned_result(ctx: Context, method: str, params: Any, seconds: float, apply: Callable | None = None) -> Result:
    from jaxopt_big import sparsity
    packed = sparsity.pack_params(params)
    fraction = sparsity.sparsity(params)
    kernels = [v for p, v in fraction.items() if p.endswith("kernel")]
    return Result(method, accuracy(ctx, _leaves.densify(packed), apply), _leaves.nbytes(packed), seconds, packed,
                  note=f"kernel sparsity {min(kernels):.2f}-{max(kernels):.2f}")


def global_magnitude(ctx: Context) -> Result:
    from jaxopt_big import sparsity
    epochs = ctx.epochs(20)
    steps = _steps(ctx, epochs)
    schedule = sparsity.polynomial_schedule(final_sparsity=0.9, begin_step=0, end_step=int(0.7 * steps),
                                            update_every=10)
    tx = sparsity.prune(_adamw(2e-3, steps), sparsity=schedule, update_every=10, scope=sparsity.Scope.GLOBAL)
    params, seconds = train_classifier(ctx, ctx.params, epochs=epochs, lr=2e-3, tx=tx, desc="global pruning 90%")
    return _pruned_result(ctx, "global magnitude 90% (polynomial) + fine-tune", params, seconds)


def two_four(ctx: Context) -> Result:
    from jaxopt_big import sparsity
    epochs = ctx.epochs(8)
    tx = sparsity.prune(_adamw(5e-4, _steps(ctx, epochs)), sparsity=0.5, structure=sparsity.NM(2, 4),
                        where=r"(Conv_1|Dense_\d+)/kernel")
    params, seconds = train_classifier(ctx, ctx.params, epochs=epochs, lr=5e-4, tx=tx, desc="2:4 sparsity")
    return _pruned_result(ctx, "2:4 sparsity (Conv_1, Dense) + fine-tune", params, seconds)


def rigl(ctx: Context) -> Result:
    from jaxopt_big import sparsity
    epochs = ctx.epochs(16)
    steps = _steps(ctx, epochs)
    tx = sparsity.rigl(_adamw(1e-3, steps), sparsity=0.9, key=ctx.key(13), update_every=50,
                       end_step=int(0.75 * steps), drop_fraction=0.1, distribution=sparsity.ERK(),
                       start=sparsity.Start.MAGNITUDE)
    params, seconds = train_classifier(ctx, ctx.params, epochs=epochs, lr=1e-3, tx=tx, desc="RigL 90%")
    return _pruned_result(ctx, "RigL 90% (ERK) from the teacher's largest weights", params, seconds)


def kfold(ctx: Context) -> Result:
    epochs = ctx.epochs(12)
    start = time.perf_counter()
    cv = _train.cross_validate(lambda key: ctx.model.init(key, ctx.train.x[:1])["params"], ctx.apply, ctx.train,
                               _adamw(3e-3, _steps(ctx, epochs)), k=5, epochs=epochs, batch_size=64, key=ctx.key(15),
                               loss_fn=_train.classifier_loss(ctx.apply, label_smoothing=0.1))
    return Result("dense CNN, 5-fold CV on the training split", cv.mean["accuracy"], ctx.dense_bytes,
                  time.perf_counter() - start, note=f"accuracy {cv.mean['accuracy']:.4f} ± {cv.std['accuracy']:.4f}",
                  extra={"std": cv.std["accuracy"], "folds": [f["accuracy"] for f in cv.folds]})


def stacked(ctx: Context) -> Result:
    """Prune 80% (global) while training an int8 fake-quantized student distilled from the teacher."""
    from jaxopt_big import distill, quant, sparsity
    epochs = ctx.epochs(12)
    steps = _steps(ctx, epochs)
    spec = quant.QuantSpec(bits=8, granularity=quant.PER_CHANNEL)
    student = lambda p, x: ctx.apply(quant.fake_quant_params(p, spec), x)
    teacher_params = ctx.params
    loss_fn = distill.combine(optax.softmax_cross_entropy_with_integer_labels, lambda x: ctx.apply(teacher_params, x),
                              student=student, alpha=0.5, temperature=4.0)
    schedule = sparsity.polynomial_schedule(final_sparsity=0.8, begin_step=0, end_step=int(0.7 * steps),
                                            update_every=10)
    tx = sparsity.prune(_adamw(1e-3, steps), sparsity=schedule, update_every=10, scope=sparsity.Scope.GLOBAL)
    params, seconds = train_classifier(ctx, ctx.params, epochs=epochs, lr=1e-3, tx=tx, loss_fn=loss_fn,
                                       desc="prune 80% + int8 QAT + KD")
    stored = jax.tree.map(lambda x: _sparse_int8(x, spec) if x.ndim >= 2 else x, params)
    restored = jax.tree.map(lambda x: x["codes"].dense().astype(jnp.float32) * x["scale"] if isinstance(x, dict) else x,
                            stored, is_leaf=lambda x: isinstance(x, dict) and "codes" in x)
    return Result("stacked: prune 80% -> int8 -> distill", accuracy(ctx, restored), _leaves.nbytes(stored), seconds,
                  stored, note="kernels stored as packed-sparse int8 codes + per-channel scales")


def _sparse_int8(w: jax.Array, spec: Any) -> dict[str, Any]:
    """A pruned kernel as its nonzero int8 codes (bit mask + values) and per-channel scales.

    Symmetric grids map 0 to code 0, so the pruned weights stay exactly zero in the codes.
    """
    from jaxopt_big import quant, sparsity
    q = quant.quantize(w, spec)
    return {"codes": sparsity.pack_array(q.int_values(), w != 0), "scale": q.scale}


STAGES: list[Callable[[Context], Result]] = [dense, global_magnitude, two_four, rigl, int8_ptq, two_bit_ptq,
                                             two_bit_qat, weight_sharing, mixed_precision, low_rank, lora_adaptation,
                                             kd_student, plain_student, kfold, stacked]


def _table(results: list[Result], ctx: Context) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = [("method", "accuracy", "delta", "bytes", "ratio", "train s")]
    for r in results:
        rows.append((r.method, f"{r.accuracy:.4f}", f"{100 * (r.accuracy - ctx.accuracy):+.2f} pt", f"{r.nbytes:,}",
                     f"{ctx.dense_bytes / r.nbytes:.2f}x", f"{r.seconds:.1f}"))
    return rows


def format_table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _plot(results: list[Result], ctx: Context, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 6))
    for i, r in enumerate(results, 1):  # numbered points and a legend: method names are too long to annotate
        ratio = ctx.dense_bytes / r.nbytes
        ax.scatter(ratio, 100 * r.accuracy, s=40, label=f"{i}. {r.method} ({100 * r.accuracy:.1f}%, {ratio:.1f}x)")
        ax.annotate(str(i), (ratio, 100 * r.accuracy), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_xscale("log")
    ax.set_xlabel("compression ratio (dense bytes / stored bytes)")
    ax.set_ylabel("hold-out accuracy (%)")
    ax.set_title("jaxopt_big on digits: accuracy vs compression")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(*, quick: bool = False, seed: int = 0, out: str | pathlib.Path | None = None,
        stages: list[Callable[[Context], Result]] | None = None, print_fn: Callable[[str], None] = print
        ) -> list[Result]:
    """Runs the demo stages on digits and returns their results (the first is the dense teacher).

    ``out`` (created if missing) is checked to be a writable folder before any training: an
    ``OSError`` comes first, not after minutes of work.
    """
    if out is not None:
        _check_writable(pathlib.Path(out))
    train, test = _data.holdout_split(_data.digits(), test_fraction=0.2, seed=seed)
    ctx = Context(train=train, test=test, quick=quick, seed=seed)
    results = []
    for stage in stages or STAGES:
        result = stage(ctx)
        results.append(result)
        print_fn(f"  {result.method}: accuracy {result.accuracy:.4f}, {result.nbytes:,} bytes, {result.seconds:.1f} s"
                 + (f" ({result.note})" if result.note else ""))
    table = format_table(_table(results, ctx))
    print_fn("\n" + table)
    if out is not None:
        _save(results, ctx, pathlib.Path(out), table)
    return results


def _check_writable(out: pathlib.Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=out):
        pass


def _save(results: list[Result], ctx: Context, out: pathlib.Path, table: str) -> None:
    from jaxopt_big import checkpoint as _checkpoint

    out.mkdir(parents=True, exist_ok=True)
    md = ["# jaxopt-big demo on digits", "", f"Dense teacher hold-out accuracy: {ctx.accuracy:.4f}", "",
          "| " + " | ".join(_table(results, ctx)[0]) + " |", "|---" * 6 + "|"]
    md += ["| " + " | ".join(r) + " |" for r in _table(results, ctx)[1:]]
    for r in results:
        if r.params is None:
            continue
        name = "_".join("".join(c if c.isalnum() else " " for c in r.method.lower()).split())
        with _checkpoint.Manager(out / "models" / name, async_save=False) as manager:
            manager.save(0, r.params, extra={"method": r.method})
        md += ["", f"## {r.method}", "", _report.summary(r.params).to_markdown()]
    (out / "report.md").write_text("\n".join(md) + "\n")
    rows = [{"method": r.method, "accuracy": r.accuracy, "delta_pt": 100 * (r.accuracy - ctx.accuracy),
             "bytes": r.nbytes, "ratio": ctx.dense_bytes / r.nbytes, "seconds": r.seconds, "note": r.note, **r.extra}
            for r in results]
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    _plot(results, ctx, out / "accuracy_vs_compression.png")
