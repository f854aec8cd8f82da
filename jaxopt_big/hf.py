"""Compress a Hugging Face-layout checkpoint directory with a recipe: the engine behind ``jaxopt-big compress``.

``compress_checkpoint(src, dst, recipe)`` loads ``config.json`` + safetensors (Llama, Qwen2 and
Mistral decoders; BERT encoders), calibrates on text (the embedded Python documentation by default),
runs :func:`jaxopt_big.oneshot.compress` block by block, measures perplexity (decoders) or embedding
cosine to the original (encoders) on held-out text before and after, and writes ``dst``:

* ``checkpoint/`` — an Orbax checkpoint of the compressed parameters (:class:`jaxopt_big.checkpoint.Manager`);
* ``report.md`` — per layer: kind, bits, sparsity, bytes, the plan, and the relative output error;
* ``config.json`` — the source configuration;
* ``hf/`` (with ``export_hf=True``) — the dequantized weights in the source layout, for other tools.

``dst`` appears only when complete: everything is written to a hidden sibling folder first and
renamed at the end, so an interrupted run never leaves a ``dst`` that looks finished.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import pathlib
import shutil
from typing import Any
from collections.abc import Callable

import jax
import numpy as np

from jaxopt_big import checkpoint as _checkpoint
from jaxopt_big import data as _data
from jaxopt_big import export as _export
from jaxopt_big import leaves as _leaves
from jaxopt_big import oneshot as _oneshot
from jaxopt_big import recipe as _recipe
from jaxopt_big import report as _report
from jaxopt_big import zoo as _zoo

__all__ = ["DECODERS", "ENCODERS", "Outcome", "compress_checkpoint", "load_compressed", "check_destination",
           "read_recipe", "model_type"]

DECODERS = ("llama", "qwen2", "mistral")
ENCODERS = ("bert",)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What :func:`compress_checkpoint` measured and wrote."""

    model_type: str
    metric: str           # "perplexity" (lower is better) or "cosine" (to the original model; higher is better)
    before: float
    after: float
    dense_bytes: int
    compressed_bytes: int
    layers: int
    directory: pathlib.Path


def model_type(src: str | pathlib.Path) -> str:
    """The ``model_type`` of a checkpoint directory, checked to be one we load.

    Raises:
      FileNotFoundError: ``src`` or its ``config.json`` is missing. ValueError: unreadable config or an
        unsupported ``model_type``.
    """
    src = pathlib.Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(src)!r} does not exist")
    try:
        config = json.loads((src / "config.json").read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{src}: no config.json (a Hugging Face checkpoint directory has one)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{src / 'config.json'}: unreadable: {e}") from None
    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind not in DECODERS + ENCODERS:
        raise ValueError(f"{src / 'config.json'}: unsupported model_type {kind!r}; "
                         f"supported: {', '.join(DECODERS + ENCODERS)}")
    return kind


def read_recipe(name_or_file: str | pathlib.Path) -> _recipe.Recipe:
    """A preset name (see :data:`jaxopt_big.recipe.PRESETS`) or a TOML recipe file."""
    if str(name_or_file) in _recipe.PRESETS:
        return _recipe.preset(str(name_or_file))
    path = pathlib.Path(name_or_file)
    if path.suffix != ".toml" and not path.exists():
        raise ValueError(f"unknown recipe {str(name_or_file)!r}: not a preset ({', '.join(_recipe.PRESETS)}) "
                         "and not a .toml file")
    if not path.is_file():
        raise FileNotFoundError(f"recipe file {str(path)!r} does not exist")
    return _recipe.load(path)


def _texts(calibration: str | pathlib.Path | None) -> tuple[str, str]:
    """(calibration text, held-out text): the embedded docs' train/validation splits, or a file's 90/10."""
    if calibration is None:
        corpus = _data.docs_corpus()
        return _data.decode(corpus.train), _data.decode(corpus.validation)
    text = pathlib.Path(calibration).read_text(errors="replace")
    cut = int(0.9 * len(text))
    return text[:cut], text[cut:]


def _decoder_ids(src: pathlib.Path, text: str, vocab: int) -> np.ndarray:
    if (src / "tokenizer.json").exists():
        from tokenizers import Tokenizer
        return np.asarray(Tokenizer.from_file(str(src / "tokenizer.json")).encode(text).ids, np.int32)
    if vocab < _data.VOCAB_SIZE:
        raise ValueError(f"{src}: no tokenizer.json, and a vocabulary of {vocab} is too small for byte-level ids")
    return _data.encode(text)


def _windows(ids: np.ndarray, length: int, count: int, what: str) -> np.ndarray:
    if len(ids) < 2 * length:
        raise ValueError(f"{what}: {len(ids)} tokens are too few for windows of {length}")
    return _data.windows(ids, length)[:count]


def _cosine(a: jax.Array, b: jax.Array) -> float:
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.mean(np.sum(x * y, -1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))))


@dataclasses.dataclass(frozen=True)
class _Prepared:
    """A loaded checkpoint with its calibration batches, held-out metric and HF exporter."""

    model: Any
    params: Any
    batches: list[Any]
    row_mask: Callable[[Any], Any] | None  # which calibration rows are real tokens (None: all)
    metric: str
    evaluate: Callable[[Any], float]
    export: Callable[[Any, pathlib.Path], None]


def _prepare(src: pathlib.Path, kind: str, texts: tuple[str, str], samples: int, length: int) -> _Prepared:
    """Model, params, calibration batches, held-out evaluation and an HF exporter for one checkpoint."""
    from flax import nnx

    if kind in DECODERS:
        model = _zoo.load_llama(src)
        vocab = model.config.vocab_size
        calib = _windows(_decoder_ids(src, texts[0], vocab), length, samples, "calibration text")
        held = _windows(_decoder_ids(src, texts[1], vocab), length, samples, "held-out text")
        params = nnx.state(model, nnx.Param)
        batches = [calib[i:i + 8] for i in range(0, len(calib), 8)]

        def evaluate(p: Any) -> float:
            clone = nnx.clone(model)
            nnx.update(clone, _leaves.densify(p))
            return _data.perplexity(clone, None, held)

        def export(p: Any, directory: pathlib.Path) -> None:
            clone = nnx.clone(model)
            nnx.update(clone, _leaves.densify(p))
            _zoo.save_llama(directory, clone)
        return _Prepared(model, params, batches, None, "perplexity", evaluate, export)

    bert, bert_params = _zoo.load_bert(src)
    tokenizer = _zoo.load_tokenizer(src / "tokenizer.json", length=length)
    lines = lambda text: [s.strip() for s in text.splitlines() if len(s.strip()) > 20][:samples]  # noqa: E731
    calib_ids, held_ids = (_zoo.tokenize(tokenizer, lines(t)) for t in texts)
    pairs = [(calib_ids[0][i:i + 8], calib_ids[1][i:i + 8])
             for i in range(0, len(calib_ids[0]) - len(calib_ids[0]) % 8, 8)]
    if not pairs:
        raise ValueError("calibration text: fewer than 8 lines of text")
    embed = jax.jit(lambda p, ids, mask: bert.apply({"params": p}, ids, mask))
    reference = embed(bert_params, *held_ids)
    evaluate = lambda p: _cosine(embed(_leaves.densify(p), *held_ids), reference)  # noqa: E731
    export = lambda p, directory: _zoo.save_bert(directory, bert.config, _leaves.densify(p))  # noqa: E731
    return _Prepared(bert, bert_params, pairs, lambda b: b[1], "cosine", evaluate, export)


def _place_result(tmp: pathlib.Path, dst: pathlib.Path) -> None:
    """Renames the finished ``tmp`` to ``dst``; an old ``dst`` (with overwrite) goes only after that works."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        dst.rename(old)
    tmp.rename(dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_destination(dst: str | pathlib.Path, *, overwrite: bool = False) -> pathlib.Path:
    """``dst`` as a path, refused when it exists and is not an empty folder (unless ``overwrite``)."""
    dst = pathlib.Path(dst)
    if dst.exists() and not overwrite and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"destination {str(dst)!r} exists and is not empty (pass --overwrite to replace it)")
    return dst


def compress_checkpoint(src: str | pathlib.Path, dst: str | pathlib.Path, recipe: _recipe.Recipe, *,
                        calibration: str | pathlib.Path | None = None, samples: int = 128, length: int = 128,
                        export_hf: bool = False, export: str | None = None, overwrite: bool = False,
                        mesh: Any = None, progress: bool = True, print_fn: Callable[[str], None] = print) -> Outcome:
    """Loads, calibrates, compresses, evaluates and writes one checkpoint (see the module docstring).

    Args:
      src: a Hugging Face-layout directory (``config.json`` + ``model.safetensors`` or a sharded index).
      dst: the output folder; it must not exist or be empty unless ``overwrite``.
      recipe: what to do per layer (e.g. ``jb.recipe.preset("gptq-int4")``).
      calibration: a plain-text file (its first 90% calibrates, the rest is held out); None: the
        embedded Python documentation (train split calibrates, validation split is held out).
      samples: calibration (and evaluation) sequences; length: tokens per sequence. The default 128 (the
        GPTQ/SparseGPT/Wanda papers' 128 segments): on the benchmark decoder 4 to 256 sequences of 128
        tokens give the same perplexity within 0.3%, but 32 short sentences were too few on MiniLM
        (SparseGPT 50% did not beat Wanda; with 128 it does).
      export_hf: also write the dequantized model in the source layout to ``dst/hf``.
      export: also write a format serving engines load (``"gguf"``: ``dst/model.gguf``;
        ``"compressed-tensors"``: ``dst/compressed-tensors/``; see :mod:`jaxopt_big.export`), decoders only.
      overwrite: replace an existing ``dst`` (only once the new one is complete).
      mesh: a mesh with a ``data`` axis to shard the calibration batches over.
      progress: progress bars; print_fn: where the summary lines go.

    Raises:
      FileNotFoundError, FileExistsError, ValueError: bad source, destination, recipe or text;
      OSError: the disk filled up (``dst`` is then absent or untouched).
    """
    src, kind = pathlib.Path(src), model_type(src)
    dst = check_destination(dst, overwrite=overwrite)
    if not isinstance(recipe, _recipe.Recipe):
        raise TypeError(f"compress_checkpoint needs a jb.Recipe, got {type(recipe).__name__}")
    job = _prepare(src, kind, _texts(calibration), samples, length)
    if export is not None:  # a spec the format cannot hold fails now, not after the compression
        _export.check(export, job.params, recipe)
    params, metric = job.params, job.metric
    before = job.evaluate(params)
    compressed, layer_report = _oneshot.compress(job.model, params, job.batches, recipe, mesh=mesh, progress=progress,
                                                 row_mask=job.row_mask)
    after = job.evaluate(compressed)
    summary = _report.summary(compressed, plan=recipe)
    outcome = Outcome(kind, metric, before, after, _leaves.nbytes(params), _leaves.nbytes(compressed),
                      len(layer_report.rows), dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        shutil.copy(src / "config.json", tmp / "config.json")
        with _checkpoint.Manager(tmp / "checkpoint", async_save=False) as manager:
            manager.save(0, _pure(compressed),
                         extra={"source": str(src), "model_type": kind, "report": summary.as_dicts()})
        (tmp / "report.md").write_text(_markdown(src, outcome, summary, layer_report))
        if export_hf:
            job.export(compressed, tmp / "hf")
            for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
                if (src / name).exists():
                    shutil.copy(src / name, tmp / "hf" / name)
        if export is not None:
            _export.write(export, tmp, job.model, compressed, source=src)
        _place_result(tmp, dst)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"disk full while writing {dst} (nothing was left there)") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    better = "lower is better" if metric == "perplexity" else "to the original model"
    print_fn(f"{metric} ({better}): {before:.4g} -> {after:.4g}")
    print_fn(f"bytes: {outcome.dense_bytes:,} -> {outcome.compressed_bytes:,} "
             f"({outcome.dense_bytes / max(outcome.compressed_bytes, 1):.2f}x); {outcome.layers} layers compressed")
    print_fn(f"wrote {dst}")
    return outcome


def _pure(params: Any) -> Any:
    """Plain nested dicts for Orbax (an ``nnx.State`` becomes its pure dict; compressed leaves stay)."""
    from flax import nnx
    return nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params


def load_compressed(directory: str | pathlib.Path) -> tuple[Any, Any]:
    """``(model, params)`` of a folder written by :func:`compress_checkpoint`, compressed leaves intact.

    Decoders: an nnx model built from ``config.json`` (weights not initialized) and an
    ``nnx.State`` of its parameters; run it with ``nnx.update(model, jb.leaves.densify(params))``
    or through :func:`jaxopt_big.quant.qat`. Encoders: the linen ``Bert`` and its ``params``.
    """
    from flax import nnx

    directory = pathlib.Path(directory)
    kind = model_type(directory)
    config = json.loads((directory / "config.json").read_text())
    with _checkpoint.Manager(directory / "checkpoint") as manager:
        restored = manager.restore(0)
    if kind in ENCODERS:
        return _zoo.Bert(_zoo.BertConfig.from_hf(config)), restored
    model = nnx.eval_shape(lambda: _zoo.Llama(_zoo.LlamaConfig.from_hf(config), rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(params, restored)
    return model, params


def _markdown(src: pathlib.Path, o: Outcome, summary: _report.Report, layers: Any) -> str:
    return "\n".join([
        f"# {src.name} ({o.model_type}), compressed", "",
        f"- {o.metric}: {o.before:.4g} before, {o.after:.4g} after",
        f"- bytes: {o.dense_bytes:,} before, {o.compressed_bytes:,} after "
        f"({o.dense_bytes / max(o.compressed_bytes, 1):.2f}x)", "",
        "## Per leaf: kind, bits, sparsity, bytes, plan", "", summary.to_markdown(), "",
        "## Per layer: relative output error on the calibration inputs", "", layers.to_markdown(), ""])
