"""The end-to-end demo: train on digits, compress every way the library supports, report.

Each stage is a function ``stage(ctx) -> Result`` that starts from the trained dense teacher (or its
own model), applies one technique through the public API and measures hold-out accuracy, true bytes
and training time. ``run`` executes the stages, prints one table, saves each compressed model with
Orbax and writes ``report.md`` and ``accuracy_vs_compression.png``.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import pathlib
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

__all__ = ["Family", "Stage", "Measured", "Result", "Teacher", "Context", "run", "writable", "STAGES", "DEFAULT_OUT"]

DEFAULT_OUT = "demo-out"


class Family(enum.Enum):
    """What a row is, for the table and the plot's colours."""

    REFERENCE = "dense reference"
    PRUNING = "pruning"
    QUANTIZATION = "quantization"
    SHARING = "weight sharing"
    LOW_RANK = "low-rank"
    COMBINED = "combined (recipe)"
    OTHER_TASK = "other task"  # not the compressed teacher: other data, labels or protocol


@dataclasses.dataclass(frozen=True)
class Measured:
    """What one stage measured."""

    accuracy: float
    nbytes: int
    seconds: float
    params: Any = None  # what gets saved (compressed leaves stay compressed)
    note: str = ""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # numbers behind the note (JSON values)


@dataclasses.dataclass(frozen=True)
class Teacher:
    """The dense CNN every compression stage starts from, trained once per run."""

    model: Any
    params: Any
    accuracy: float
    nbytes: int
    seconds: float


@dataclasses.dataclass(frozen=True)
class Context:
    """What every stage reads: the data split, the trained teacher and the run settings."""

    train: _data.Dataset
    test: _data.Dataset
    quick: bool
    seed: int
    teacher: Teacher

    @property
    def model(self) -> Any:
        return self.teacher.model

    @property
    def params(self) -> Any:
        return self.teacher.params

    def apply(self, params: Any, x: jax.Array) -> jax.Array:
        return self.teacher.model.apply({"params": params}, x)

    def key(self, i: int) -> jax.Array:
        return jax.random.fold_in(jax.random.key(self.seed), i)

    def epochs(self, full: int) -> int:
        return max(1, full // 2) if self.quick else full


@dataclasses.dataclass(frozen=True)
class Stage:
    """One row of the demo: ``name`` is its id (results key and model directory), ``title`` its label."""

    name: str
    title: str
    family: Family
    run: Callable[[Context], Measured]


@dataclasses.dataclass(frozen=True)
class Result:
    """A stage and what it measured."""

    stage: Stage
    measured: Measured


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


def train_teacher(train: _data.Dataset, test: _data.Dataset, *, quick: bool, seed: int) -> Teacher:
    """The dense CNN (AdamW, warm-up cosine, label smoothing) that the compression stages start from."""
    model = _models.CNN()
    ctx = Context(train, test, quick, seed, Teacher(model, None, 0.0, 0, 0.0))
    params = model.init(ctx.key(0), train.x[:1])["params"]
    params, seconds = train_classifier(ctx, params, epochs=ctx.epochs(20), lr=3e-3, desc="dense CNN")
    return Teacher(model, params, accuracy(ctx, params), _leaves.nbytes(params), seconds)


def dense(ctx: Context) -> Measured:
    t = ctx.teacher
    return Measured(t.accuracy, t.nbytes, t.seconds, t.params)


def _quantized_accuracy(ctx: Context, qparams: Any, **qat_kwargs) -> float:
    from jaxopt_big import quant
    run = quant.qat(ctx.model.apply, **qat_kwargs)
    return accuracy(ctx, qparams, lambda p, x: run({"params": p}, x))


def int8_ptq(ctx: Context) -> Measured:
    from jaxopt_big import quant
    start = time.perf_counter()
    qparams = quant.quantize_params(ctx.params, quant.QuantSpec(bits=8, granularity=quant.PER_CHANNEL))
    calib = [({"params": qparams}, b.x) for b in _data.batches(ctx.train, 128)][:8]
    scales = quant.calibrate_activations(ctx.model.apply, calib, quant.QuantSpec(bits=8))
    seconds = time.perf_counter() - start
    acc = _quantized_accuracy(ctx, qparams, activations=quant.QuantSpec(bits=8), scales=scales)
    return Measured(acc, _leaves.nbytes(qparams), seconds, qparams)


def _two_bit(calibration) -> Any:
    from jaxopt_big import quant
    return quant.QuantSpec(bits=2, granularity=quant.PER_CHANNEL, calibration=calibration)


def two_bit_ptq(ctx: Context) -> Measured:
    from jaxopt_big import quant
    start = time.perf_counter()
    qparams = quant.quantize_params(ctx.params, _two_bit(quant.MSE()))
    seconds = time.perf_counter() - start
    absmax = accuracy(ctx, _leaves.densify(quant.quantize_params(ctx.params, _two_bit(quant.AbsMax()))))
    return Measured(_quantized_accuracy(ctx, qparams), _leaves.nbytes(qparams), seconds, qparams,
                    note=f"absmax calibration: {absmax:.4f}", extra={"absmax_accuracy": absmax})


def two_bit_qat(ctx: Context) -> Measured:
    from jaxopt_big import quant
    spec = _two_bit(quant.AbsMax())
    run = quant.qat(ctx.model.apply, weights=spec)
    apply = lambda p, x: run({"params": p}, x)
    params, seconds = train_classifier(ctx, ctx.params, epochs=ctx.epochs(8), lr=1e-3, apply=apply, desc="2-bit QAT")
    qparams = quant.quantize_params(params, spec)
    return Measured(_quantized_accuracy(ctx, qparams), _leaves.nbytes(qparams), seconds, qparams)


def weight_sharing(ctx: Context) -> Measured:
    from jaxopt_big import quant
    start = time.perf_counter()
    clustered = quant.cluster(ctx.params, 8, key=ctx.key(8))
    seconds = time.perf_counter() - start
    apply = lambda books, x: ctx.apply(_leaves.densify(quant.with_codebooks(clustered, books)), x)
    books, tuned = train_classifier(ctx, quant.codebooks(clustered), epochs=ctx.epochs(4), lr=3e-4, apply=apply,
                                    desc="centroid fine-tune")
    clustered = quant.with_codebooks(clustered, books)
    return Measured(accuracy(ctx, _leaves.densify(clustered)), _leaves.nbytes(clustered), seconds + tuned, clustered)


def mixed_precision(ctx: Context) -> Measured:
    from jaxopt_big import quant
    start = time.perf_counter()
    spec = quant.QuantSpec(bits=8, granularity=quant.PER_CHANNEL, calibration=quant.MSE())
    calib = next(_data.batches(ctx.train, 512, key=ctx.key(9)))
    sens = quant.sensitivity(_train.classifier_loss(ctx.apply), ctx.params, (calib.x, calib.y), bits=(2, 4, 8),
                             spec=spec)
    sizes = quant.layer_bytes(ctx.params, bits=(2, 4, 8), spec=spec)
    budget = int(1.25 * sum(s[2] for s in sizes.values()))
    bits = quant.allocate_bits(sens, sizes, budget)
    qparams = quant.quantize_params(ctx.params, quant.allocation_rules(bits, spec))
    seconds = time.perf_counter() - start
    note = ", ".join(f"{p.split('/')[0]}:{b}" for p, b in bits.items())
    return Measured(_quantized_accuracy(ctx, qparams), _leaves.nbytes(qparams), seconds, qparams, note=note)


def low_rank(ctx: Context) -> Measured:
    from jaxopt_big import lowrank
    kernel = ctx.params["Dense_0"]["kernel"]
    factored = lowrank.factorize_params(ctx.params, [Rule("Dense_0/kernel", {"max_params": kernel.size // 2})])
    run = lowrank.apply(ctx.model.apply)
    apply = lambda p, x: run({"params": p}, x)
    params, seconds = train_classifier(ctx, factored, epochs=ctx.epochs(4), lr=1e-3, apply=apply,
                                       desc="low-rank fine-tune")
    return Measured(accuracy(ctx, params, apply), _leaves.nbytes(params), seconds, params)


def lora_adaptation(ctx: Context) -> Measured:
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
    return Measured(lora_acc, _leaves.nbytes(adapters), seconds, adapted,
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


def kd_student(ctx: Context) -> Measured:
    from jaxopt_big import distill
    transfer, _ = _transfer_set(ctx)
    _, params, apply = _student(ctx)
    teacher = lambda x: ctx.apply(ctx.params, x)
    kd = distill.combine(optax.softmax_cross_entropy_with_integer_labels, teacher, student=apply, alpha=0.5,
                         temperature=4.0)
    loss_fn = lambda p, b: kd(p, distill.Batch(x=b[0], y=jnp.maximum(b[1], 0), labeled=b[1] >= 0))
    params, seconds = train_classifier(ctx, params, epochs=ctx.epochs(40), lr=2e-3, apply=apply, loss_fn=loss_fn,
                                       data=transfer, desc="KD student")
    return Measured(accuracy(ctx, params, apply), _leaves.nbytes(params), seconds, params)


def plain_student(ctx: Context) -> Measured:
    _, labeled = _transfer_set(ctx)
    _, params, apply = _student(ctx)
    # Same optimizer, steps and (unsmoothed) cross-entropy as the KD student's task term.
    params, seconds = train_classifier(ctx, params, epochs=10 * ctx.epochs(40), lr=2e-3, apply=apply, data=labeled,
                                       loss_fn=_train.classifier_loss(apply), desc="plain student")
    return Measured(accuracy(ctx, params, apply), _leaves.nbytes(params), seconds, params,
                    note="same optimizer, steps and cross-entropy as the KD student")


def _steps(ctx: Context, epochs: int) -> int:
    return epochs * (len(ctx.train) // 64)


def _pruned(ctx: Context, params: Any, seconds: float) -> Measured:
    from jaxopt_big import sparsity
    packed = sparsity.pack_params(params)
    fraction = sparsity.sparsity(params)
    kernels = [v for p, v in fraction.items() if p.endswith("kernel")]
    return Measured(accuracy(ctx, _leaves.densify(packed)), _leaves.nbytes(packed), seconds, packed,
                    note=f"kernel sparsity {min(kernels):.2f}-{max(kernels):.2f}")


def global_magnitude(ctx: Context) -> Measured:
    from jaxopt_big import sparsity
    epochs = ctx.epochs(20)
    steps = _steps(ctx, epochs)
    schedule = sparsity.polynomial_schedule(final_sparsity=0.9, begin_step=0, end_step=int(0.7 * steps),
                                            update_every=10)
    tx = sparsity.prune(_adamw(2e-3, steps), sparsity=schedule, update_every=10, scope=sparsity.Scope.GLOBAL)
    params, seconds = train_classifier(ctx, ctx.params, epochs=epochs, lr=2e-3, tx=tx, desc="global pruning 90%")
    return _pruned(ctx, params, seconds)


def two_four(ctx: Context) -> Measured:
    from jaxopt_big import sparsity
    epochs = ctx.epochs(8)
    tx = sparsity.prune(_adamw(5e-4, _steps(ctx, epochs)), sparsity=0.5, structure=sparsity.NM(2, 4),
                        where=r"(Conv_1|Dense_\d+)/kernel")
    params, seconds = train_classifier(ctx, ctx.params, epochs=epochs, lr=5e-4, tx=tx, desc="2:4 sparsity")
    return _pruned(ctx, params, seconds)


def rigl(ctx: Context) -> Measured:
    from jaxopt_big import sparsity
    epochs = ctx.epochs(16)
    steps = _steps(ctx, epochs)
    tx = sparsity.rigl(_adamw(1e-3, steps), sparsity=0.9, key=ctx.key(13), update_every=50,
                       end_step=int(0.75 * steps), drop_fraction=0.1, distribution=sparsity.ERK(),
                       start=sparsity.Start.MAGNITUDE)
    params, seconds = train_classifier(ctx, ctx.params, epochs=epochs, lr=1e-3, tx=tx, desc="RigL 90%")
    return _pruned(ctx, params, seconds)


def kfold(ctx: Context) -> Measured:
    epochs = ctx.epochs(12)
    start = time.perf_counter()
    cv = _train.cross_validate(lambda key: ctx.model.init(key, ctx.train.x[:1])["params"], ctx.apply, ctx.train,
                               _adamw(3e-3, _steps(ctx, epochs)), k=5, epochs=epochs, batch_size=64, key=ctx.key(15),
                               loss_fn=_train.classifier_loss(ctx.apply, label_smoothing=0.1))
    return Measured(cv.mean["accuracy"], ctx.teacher.nbytes, time.perf_counter() - start,
                    note=f"accuracy {cv.mean['accuracy']:.4f} ± {cv.std['accuracy']:.4f}",
                    extra={"std": cv.std["accuracy"], "folds": [f["accuracy"] for f in cv.folds]})


def stacked(ctx: Context) -> Measured:
    """One recipe (prune 80% -> int8 per channel) trained with distillation from the teacher, then stored."""
    from jaxopt_big import distill, quant, recipe
    epochs = ctx.epochs(12)
    steps = _steps(ctx, epochs)
    int8 = quant.QuantSpec(bits=8, granularity=quant.PER_CHANNEL)
    # The tiny first convolution and the classifier stay unpruned (as a global threshold would leave them).
    compress = recipe.Recipe([Rule("Conv_0|Dense_1", recipe.Plan(quant=int8)),
                              Rule(".*", recipe.Plan(sparsity=0.8, quant=int8))])
    ramp = optax.polynomial_schedule(0.0, 1.0, power=3, transition_steps=int(0.7 * steps))
    tx, student = compress.for_training(_adamw(1e-3, steps), ctx.apply, ctx.params, ramp=ramp, update_every=10)
    loss_fn = distill.combine(optax.softmax_cross_entropy_with_integer_labels, lambda x: ctx.apply(ctx.params, x),
                              student=student, alpha=0.5, temperature=4.0)
    params, seconds = train_classifier(ctx, ctx.params, epochs=epochs, lr=1e-3, tx=tx, loss_fn=loss_fn,
                                       desc="prune 80% + int8 QAT + KD")
    stored = compress.apply(params)
    return Measured(accuracy(ctx, _leaves.densify(stored)), _leaves.nbytes(stored), seconds, stored,
                    note="one recipe: kernels stored as pruned int8 leaves")


STAGES: list[Stage] = [
    Stage("dense", "dense CNN (teacher)", Family.REFERENCE, dense),
    Stage("global_magnitude", "global magnitude 90% (polynomial) + fine-tune", Family.PRUNING, global_magnitude),
    Stage("two_four", "2:4 sparsity (Conv_1, Dense) + fine-tune", Family.PRUNING, two_four),
    Stage("rigl", "RigL 90% (ERK) from the teacher's largest weights", Family.PRUNING, rigl),
    Stage("int8_ptq", "int8 PTQ (weights + static activations)", Family.QUANTIZATION, int8_ptq),
    Stage("two_bit_ptq", "2-bit PTQ (MSE calibration)", Family.QUANTIZATION, two_bit_ptq),
    Stage("two_bit_qat", "2-bit QAT (weights)", Family.QUANTIZATION, two_bit_qat),
    Stage("weight_sharing", "8-cluster weight sharing + centroid fine-tune", Family.SHARING, weight_sharing),
    Stage("mixed_precision", "mixed precision (2/4/8 bits, 1.25x 2-bit bytes)", Family.QUANTIZATION, mixed_precision),
    Stage("low_rank", "low-rank 50% of Dense_0 + fine-tune", Family.LOW_RANK, low_rank),
    Stage("lora", "LoRA r=4 adapters (0-4 -> 5-9)", Family.OTHER_TASK, lora_adaptation),
    Stage("kd_student", "KD MLP student (10% labels + teacher)", Family.OTHER_TASK, kd_student),
    Stage("plain_student", "plain MLP student (10% labels)", Family.OTHER_TASK, plain_student),
    Stage("kfold", "dense CNN, 5-fold CV on the training split", Family.OTHER_TASK, kfold),
    Stage("stacked", "stacked: prune 80% -> int8 -> distill", Family.COMBINED, stacked),
]


def _table(results: list[Result], teacher: Teacher) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = [("method", "family", "accuracy", "delta", "bytes", "ratio", "train s")]
    for r in results:
        m = r.measured
        rows.append((r.stage.title, r.stage.family.value, f"{m.accuracy:.4f}",
                     f"{100 * (m.accuracy - teacher.accuracy):+.2f} pt", f"{m.nbytes:,}",
                     f"{teacher.nbytes / m.nbytes:.2f}x", f"{m.seconds:.1f}"))
    return rows


def format_table(rows: list[tuple[str, ...]]) -> str:
    """An aligned text table (first row: header; first two columns left-aligned)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def run(*, quick: bool = False, seed: int = 0, out: str | pathlib.Path | None = DEFAULT_OUT,
        stages: list[Stage] | None = None, print_fn: Callable[[str], None] = print) -> list[Result]:
    """Trains the teacher once, runs the stages on digits and returns their results.

    Writes ``report.md``, ``results.json``, the accuracy-vs-size plot and one Orbax checkpoint per
    model to ``out`` (None: write nothing), replacing what an earlier run wrote there. The folder is
    checked to be writable before training.
    """
    if out is not None:
        out = writable(out)
    train, test = _data.holdout_split(_data.digits(), test_fraction=0.2, seed=seed)
    ctx = Context(train, test, quick, seed, train_teacher(train, test, quick=quick, seed=seed))
    results = []
    for stage in stages or STAGES:
        result = Result(stage, stage.run(ctx))
        results.append(result)
        m = result.measured
        print_fn(f"  {stage.title}: accuracy {m.accuracy:.4f}, {m.nbytes:,} bytes, {m.seconds:.1f} s"
                 + (f" ({m.note})" if m.note else ""))
    table = format_table(_table(results, ctx.teacher))
    print_fn("\n" + table)
    if out is not None:
        for path in _save(results, ctx.teacher, out, table):
            print_fn(f"wrote {path}")
    return results


def writable(out: str | pathlib.Path) -> pathlib.Path:
    """Creates ``out`` if needed and checks a file can be written there (before minutes of training).

    Raises:
      OSError: the folder cannot be created or written (the message names it).
    """
    out = pathlib.Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise OSError(f"output folder {str(out)!r} is not writable: {e.strerror or e}") from None
    return out


def _save(results: list[Result], teacher: Teacher, out: pathlib.Path, table: str) -> list[pathlib.Path]:
    from jaxopt_big import checkpoint as _checkpoint
    from jaxopt_big import _plot

    rows = _table(results, teacher)
    md = ["# jaxopt-big demo on digits", "", f"Dense teacher hold-out accuracy: {teacher.accuracy:.4f}", "",
          "![accuracy vs size](accuracy_vs_compression.png)", "",
          "| " + " | ".join(rows[0]) + " |", "|---" * len(rows[0]) + "|"]
    md += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    for r in results:
        if r.measured.params is None:
            continue
        with _checkpoint.Manager(out / "models" / r.stage.name, async_save=False) as manager:
            manager.save(0, r.measured.params, overwrite=True,  # a rerun replaces the last run's model
                         extra={"method": r.stage.title, "report": _report.summary(r.measured.params).as_dicts()})
        md += ["", f"## {r.stage.title}", "", _report.summary(r.measured.params).to_markdown()]
    report_md, results_json, plot = out / "report.md", out / "results.json", out / "accuracy_vs_compression.png"
    report_md.write_text("\n".join(md) + "\n")
    data = [{"name": r.stage.name, "method": r.stage.title, "family": r.stage.family.value,
             "accuracy": r.measured.accuracy, "delta_pt": 100 * (r.measured.accuracy - teacher.accuracy),
             "bytes": r.measured.nbytes, "ratio": teacher.nbytes / r.measured.nbytes, "seconds": r.measured.seconds,
             "note": r.measured.note, **r.measured.extra} for r in results]
    results_json.write_text(json.dumps(data, indent=2) + "\n")
    _plot.plot(data, plot)
    return [report_md, results_json, plot]
