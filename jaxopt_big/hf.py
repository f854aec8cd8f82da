"""Compress a Hugging Face-layout checkpoint directory with a recipe: the engine behind ``jaxopt-big compress``.

``compress_checkpoint(src, dst, recipe)`` loads ``config.json`` + safetensors (Llama, Qwen2 and
Mistral decoders; BERT encoders), calibrates on text (the embedded Python documentation by default),
runs :func:`jaxopt_big.oneshot.compress` block by block, measures perplexity (decoders) or embedding
cosine to the original (encoders) on held-out text before and after, and writes ``dst``:

* ``checkpoint/`` — an Orbax checkpoint of the compressed parameters (:class:`jaxopt_big.checkpoint.Manager`);
* ``report.md`` — per layer: kind, bits, sparsity, bytes, the plan, and the relative output error;
* ``config.json`` — the source configuration (a rotated decoder's, ``Recipe.rotate``, also says that its
  head is untied and, for an online Hadamard, ``jaxopt_big_online_hadamard``, which our loaders read);
* ``recipe.toml`` (with ``jb.recipe.Auto``) — the bits chosen per layer, a recipe file for ``--recipe``;
* ``hf/`` (with ``export_hf=True``) — the dequantized weights in the source layout and dtype, with the
  source's ``config.json`` and tokenizer files, for other tools.

Weights the recipe leaves uncompressed (embeddings, norms, the head) keep the source's dtype; "bytes
before" are the source's tensors as stored. A NaN or Inf source weight is refused, naming it. Decoders
are tokenized with the checkpoint's ``tokenizer.json`` (the only tokenizer format read).

``dst`` appears only when complete: everything is written to a hidden sibling folder
(``.DST.partial-PID``) first and renamed at the end, so an interrupted run never leaves a ``dst`` that
looks finished. The destination is checked before anything is loaded; it may not be ``src``, a folder
above it or a folder inside it, so the source is never modified. Partial folders that an earlier,
killed run left (its process is gone) are removed, with a line saying so, unless ``resume`` takes
one over: each finished block is saved there atomically, so a killed run continues from its last
finished block.

Decoders stream: every tensor is read from the safetensors files when it is needed
(``jb.zoo.load_llama(..., lazy=True)``): a layer when the engine reaches it, the embeddings while it
captures the first layer's inputs, and perplexity is measured one layer at a time, so one float layer
is held at a time besides the compressed result.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import glob
import json
import os
import pathlib
import pickle
import resource
import shutil
import time
from typing import Any
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_big import checkpoint as _checkpoint
from jaxopt_big import data as _data
from jaxopt_big import export as _export
from jaxopt_big import intercept as _intercept
from jaxopt_big import leaves as _leaves
from jaxopt_big import oneshot as _oneshot
from jaxopt_big import recipe as _recipe
from jaxopt_big import report as _report
from jaxopt_big import tree as _tree
from jaxopt_big import zoo as _zoo

__all__ = ["DECODERS", "ENCODERS", "ROTATION_SEED", "Outcome", "compress_checkpoint", "load_compressed",
           "check_destination", "read_recipe", "model_type"]

DECODERS, ENCODERS = _zoo.DECODERS, _zoo.ENCODERS  # the model families, as jb.zoo lists them
ROTATION_SEED = 0  # random signs of the Hadamard rotation (Recipe.rotate); recorded in the checkpoint


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What :func:`compress_checkpoint` measured and wrote."""

    model_type: str
    metric: str           # "perplexity" (lower is better) or "cosine" (to the original model; higher is better)
    before: float
    after: float
    dense_bytes: int      # the source's tensors as stored (2 bytes a bfloat16 weight)
    compressed_bytes: int  # the compressed tree's true nbytes (uncompressed leaves in the source dtype)
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
        problem = "is not a directory" if src.exists() else "does not exist"
        raise FileNotFoundError(f"checkpoint directory {str(src)!r} {problem}")
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


def read_recipe(name_or_file: str | pathlib.Path, *, bits: float | None = None,
                choices: tuple[int, ...] | None = None) -> _recipe.Recipe | _recipe.Auto:
    """A preset name (see :data:`jaxopt_big.recipe.PRESETS`), a TOML recipe file, or ``"auto"``: bits per
    layer chosen on the checkpoint for ``bits`` average bits per weight (:class:`jaxopt_big.recipe.Auto`,
    ``choices`` its bit widths; both only with ``"auto"``)."""
    if str(name_or_file) == "auto":
        if bits is None:
            raise ValueError("--recipe auto needs --bits: average bits per weight, scales included (e.g. 4.25)")
        return _recipe.Auto(bits=bits) if choices is None else _recipe.Auto(bits=bits, choices=choices)
    if bits is not None or choices is not None:
        raise ValueError(f"--bits and --choices go with --recipe auto only, not with --recipe {str(name_or_file)!r}")
    if str(name_or_file) in _recipe.PRESETS:
        return _recipe.preset(str(name_or_file))
    path = pathlib.Path(name_or_file)
    if path.suffix != ".toml" and not path.exists():
        raise ValueError(f"unknown recipe {str(name_or_file)!r}: not a preset ({', '.join(_recipe.PRESETS)}) "
                         "and not a .toml file")
    if not path.is_file():
        problem = "is a directory, not a .toml file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"recipe file {str(path)!r} {problem}")
    return _recipe.load(path)


def _read_text(path: str | pathlib.Path) -> str:
    """A calibration file's text, refused unless it is UTF-8 text."""
    path = pathlib.Path(path)
    if not path.is_file():
        problem = "is not a file" if path.exists() else "does not exist"
        raise FileNotFoundError(f"calibration file {str(path)!r} {problem}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"calibration file {str(path)!r} is not UTF-8 text "
                         f"(byte {data[e.start]:#04x} at offset {e.start})") from None
    if "\0" in text:
        raise ValueError(f"calibration file {str(path)!r} is not text (a NUL byte at character {text.index(chr(0))})")
    return text


def _texts(calibration: str | pathlib.Path | None) -> tuple[str, str]:
    """(calibration text, held-out text): the embedded docs' train/validation splits, or a file's 90/10."""
    if calibration is None:
        corpus = _data.docs_corpus()
        return _data.decode(corpus.train), _data.decode(corpus.validation)
    text = _read_text(calibration)
    cut = int(0.9 * len(text))
    return text[:cut], text[cut:]


def _tokenizer_file(src: pathlib.Path) -> pathlib.Path:
    """``src/tokenizer.json``, the only tokenizer format read: calibrating on anything else would be wrong."""
    path = src / "tokenizer.json"
    if not path.is_file():
        other = [n for n in ("tokenizer.model", "vocab.json", "vocab.txt") if (src / n).exists()]
        found = f"only {other[0]}, which is not read" if other else "no tokenizer"
        raise ValueError(f"{src}: no tokenizer.json ({found}); save the tokenizer with transformers' "
                         "save_pretrained to write one")
    return path


def _check_ids(ids: np.ndarray, vocab: int, path: pathlib.Path, tokenizer: Any) -> np.ndarray:
    """``ids``, refused when the tokenizer gives ids the model's embedding does not have."""
    if ids.size and int(ids.max()) >= vocab:
        raise ValueError(f"{path}: token id {int(ids.max())} is outside the model's vocabulary: the tokenizer has "
                         f"{tokenizer.get_vocab_size()} tokens, config.json vocab_size is {vocab}")
    return ids


def _windows(ids: np.ndarray, length: int, count: int, what: str) -> np.ndarray:
    if len(ids) < 2 * length:
        raise ValueError(f"{what}: {len(ids)} tokens are too few for windows of {length}")
    return _data.windows(ids, length)[:count]


class _Batch(tuple):
    """One calibration batch: the model's arguments, and ``weights`` ``(rows, length)`` for the Hessians
    (0 for padding tokens and for the rows that fill up a short last batch)."""

    weights: np.ndarray


def _batches(arrays: tuple[np.ndarray, ...], weights: np.ndarray, size: int = 8) -> list[_Batch]:
    """Batches of ``size`` rows (or of all rows, if fewer): any row count works, and every batch has one
    shape (one compile), because the last is filled up with copies of its first row, weighted 0."""
    n = len(weights)
    size = min(size, n)
    out = []
    for start in range(0, n, size):
        rows = np.arange(start, start + size)
        real = rows < n
        rows = np.where(real, rows, start)
        batch = _Batch(a[rows] for a in arrays)
        batch.weights = (weights[rows] * real[:, None]).astype(np.float32)
        out.append(batch)
    return out


_FLOATS = {"F16": np.dtype("float16"), "BF16": np.dtype(jnp.bfloat16), "F32": np.dtype("float32"),
           "F64": np.dtype("float64")}


def _stored(src: pathlib.Path) -> tuple[int, np.dtype]:
    """(bytes of the tensors as stored, the float dtype that holds them: the widest if they differ) of the
    ``model.safetensors`` or of the shards a ``model.safetensors.index.json`` lists, from their headers."""
    index = src / "model.safetensors.index.json"
    files = ({src / f for f in json.loads(index.read_text())["weight_map"].values()} if index.exists()
             else {src / "model.safetensors"})
    total, dtypes = 0, set()
    for f in files:
        with f.open("rb") as stream:
            header = json.loads(stream.read(int.from_bytes(stream.read(8), "little")))
        for name, entry in header.items():
            if name != "__metadata__":
                total += entry["data_offsets"][1] - entry["data_offsets"][0]
                dtypes.add(_FLOATS.get(entry["dtype"], np.dtype("float32")))
    return total, np.result_type(*dtypes) if dtypes else np.dtype("float32")


def _check_finite(src: pathlib.Path, params: Any) -> None:
    """Refuses NaN or Inf source weights: they would make every result NaN, silently (a lazy one is
    checked when it is read)."""
    pure = _pure(params)
    for path, leaf in zip(_tree.paths(pure), jax.tree.leaves(pure)):
        if _oneshot.is_lazy(leaf):
            continue
        bad = int(jnp.size(leaf) - jnp.isfinite(leaf).sum()) if jnp.issubdtype(leaf.dtype, jnp.floating) else 0
        if bad:
            raise ValueError(f"{src}: weight {path} has {bad} NaN or Inf value{'s' * (bad > 1)} in the checkpoint")


def _as_stored(params: Any, dtype: np.dtype) -> Any:
    """Uncompressed float leaves back in the checkpoint's dtype (they were computed in float32)."""
    def cast(x: Any) -> Any:
        return x if _leaves.is_compressed(x) or not jnp.issubdtype(x.dtype, jnp.floating) else x.astype(dtype)
    return jax.tree.map(cast, params, is_leaf=_leaves.is_compressed)


def _recast(file: pathlib.Path, dtype: np.dtype) -> None:
    """Rewrites the float tensors of a safetensors file in ``dtype``."""
    from safetensors.numpy import load_file, save_file

    if dtype != np.float32:
        tensors = load_file(str(file))
        save_file({k: v.astype(dtype) if np.issubdtype(v.dtype, np.floating) else v for k, v in tensors.items()},
                  str(file), metadata={"format": "pt"})


def _cosine(a: jax.Array, b: jax.Array) -> float:
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.mean(np.sum(x * y, -1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))))


@dataclasses.dataclass(frozen=True)
class _Prepared:
    """A loaded checkpoint with its calibration batches, held-out metric and HF exporter."""

    model: Any
    params: Any
    batches: list[_Batch]
    metric: str
    evaluate: Callable[[Any], float]
    export: Callable[[Any, pathlib.Path], None]


def _prepare(src: pathlib.Path, kind: str, texts: tuple[str, str], samples: int, length: int,
             rotate: _recipe.Rotate | None = None) -> _Prepared:
    """Model (rotated if asked), params, calibration batches, held-out evaluation and an HF exporter."""
    from flax import nnx

    if kind in DECODERS:
        from tokenizers import Tokenizer

        path = _tokenizer_file(src)
        tokenizer = Tokenizer.from_file(str(path))
        if rotate is None:
            model = _zoo.load_llama(src, lazy=True)  # layers are read when the engine reaches them
        else:  # the rotation reads every weight
            model = _zoo.rotate(_zoo.load_llama(src), key=jax.random.key(ROTATION_SEED),
                                online_hadamard=rotate is _recipe.Rotate.ONLINE)
        ids = lambda text: _check_ids(np.asarray(tokenizer.encode(text).ids, np.int32),  # noqa: E731
                                      model.config.vocab_size, path, tokenizer)
        calib = _windows(ids(texts[0]), length, samples, "calibration text")
        held = _windows(ids(texts[1]), length, samples, "held-out text")
        params = nnx.state(model, nnx.Param)
        batches = _batches((calib,), np.ones(calib.shape, np.float32))

        def evaluate(p: Any) -> float:
            return _perplexity_by_layer(model, p, held)

        def export(p: Any, directory: pathlib.Path) -> None:
            clone = nnx.eval_shape(lambda: _zoo.Llama(model.config, rngs=nnx.Rngs(0)))
            nnx.update(clone, _leaves.densify(p))
            _zoo.save_llama(directory, clone)
        return _Prepared(model, params, batches, "perplexity", evaluate, export)

    path = _tokenizer_file(src)
    bert, bert_params = _zoo.load_bert(src)
    tokenizer = _zoo.load_tokenizer(path, length=length)

    def tokenized(text: str, what: str) -> tuple[np.ndarray, np.ndarray]:
        lines = [s.strip() for s in text.splitlines() if len(s.strip()) > 20][:samples]
        if not lines:
            raise ValueError(f"{what}: no line longer than 20 characters")
        ids, mask = _zoo.tokenize(tokenizer, lines)
        return _check_ids(ids, bert.config.vocab_size, path, tokenizer), mask
    calib_ids, held_ids = tokenized(texts[0], "calibration text"), tokenized(texts[1], "held-out text")
    embed = jax.jit(lambda p, ids, mask: bert.apply({"params": p}, ids, mask))
    reference = embed(bert_params, *held_ids)
    evaluate = lambda p: _cosine(embed(_leaves.densify(p), *held_ids), reference)  # noqa: E731
    export = lambda p, directory: _zoo.save_bert(directory, bert.config, _leaves.densify(p))  # noqa: E731
    return _Prepared(bert, bert_params, _batches(calib_ids, calib_ids[1]), "cosine", evaluate, export)


def _perplexity_by_layer(model: Any, params: Any, ids: np.ndarray, batch_size: int = 8) -> float:
    """The perplexity of ``model`` on ``params`` over ``ids``, as :func:`jaxopt_big.data.perplexity` gives it,
    computed one layer at a time over all sequences: one layer is held (read from the checkpoint when
    lazy), not the whole model. Compressed kernels of a layer run through their execution hooks, as
    :func:`jaxopt_big.zoo.generate` runs them (a W8A8 kernel quantizes its inputs per token)."""
    from flax import nnx

    def runner(module: Any) -> Callable:
        graphdef, _, rest = nnx.split(module, nnx.Param, ...)  # type: ignore[misc]  # flax types the split as variadic

        def call(p: Any, x: Any, method: str | None = None) -> Any:
            m = nnx.merge(graphdef, p, rest)
            if method is not None:
                return getattr(m, method)(x)
            return (_intercept.run_compressed(m) if _leaves.has_compressed(p) else m)(x)
        return jax.jit(call, static_argnames="method")

    def part(state: Any) -> Any:
        return _oneshot.read_lazy(_leaves.densify(state))

    batches = [ids[i:i + batch_size] for i in range(0, len(ids), batch_size)]
    embed = part(params["embed_tokens"])
    hidden = [runner(model.embed_tokens)(embed, b) for b in batches]
    layer = runner(model.layers[0])  # every layer has the same structure: one compile
    for i in range(model.config.num_layers):
        state = _oneshot.read_lazy(params["layers"][i])
        hidden = [layer(state, x) for x in hidden]
    norm = runner(model.norm)
    head, head_params, method = ((runner(model.embed_tokens), embed, "attend") if model.lm_head is None
                                 else (runner(model.lm_head), part(params["lm_head"]), None))
    total, count = 0.0, 0
    for b, x in zip(batches, hidden):
        logits = head(head_params, norm(part(params["norm"]), x), method=method)
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        total += float(-jnp.take_along_axis(logp, jnp.asarray(b)[:, 1:, None], axis=-1).sum())
        count += b[:, 1:].size
    return float(np.exp(total / count))


def _remove(path: pathlib.Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
    """Swaps two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    OS or file system has no such call."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_cwd, rename_exchange = -100, 2
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _place_result(tmp: pathlib.Path, dst: pathlib.Path) -> None:
    """Puts the finished ``tmp`` at ``dst``.

    An existing ``dst`` (with overwrite) is swapped with ``tmp`` in one atomic exchange and then deleted
    under the hidden name, so ``dst`` is always either the old or the new result; a kill before the
    deletion leaves only a partial folder, which the next run removes. Without an exchange call
    (not Linux) the old ``dst`` is renamed aside first: an interrupt between the two renames leaves it
    as ``.DST.old-PID``.
    """
    if not (dst.exists() or dst.is_symlink()):
        tmp.rename(dst)
    elif _exchange(tmp, dst):
        _remove(tmp)
    else:
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        dst.rename(old)
        tmp.rename(dst)
        _remove(old)


def _partial(dst: pathlib.Path) -> pathlib.Path:
    return dst.with_name(f".{dst.name}.partial-{os.getpid()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _stale_partials(dst: pathlib.Path) -> list[pathlib.Path]:
    """The hidden ``.DST.partial-PID`` folders of earlier runs whose process is gone."""
    return [p for p in dst.parent.glob(f".{glob.escape(dst.name)}.partial-*")
            if (pid := p.name.rpartition("-")[2]).isdigit() and int(pid) != os.getpid() and not _alive(int(pid))]


def check_destination(dst: str | pathlib.Path, *, overwrite: bool = False,
                      src: str | pathlib.Path | None = None) -> pathlib.Path:
    """``dst`` as an absolute path, checked before any work is done.

    Raises:
      ValueError: ``dst`` is ``src``, a folder above it or a folder inside it (the source is never
        modified). FileExistsError: ``dst`` exists and is not an empty folder, without ``overwrite``.
      OSError: ``dst`` cannot be created (a parent is a file or is not writable).
    """
    dst = pathlib.Path(dst).resolve()
    if src is not None:
        source = pathlib.Path(src).resolve()
        if dst == source or dst in source.parents:
            raise ValueError(f"destination {str(dst)!r} is the source checkpoint or a folder above it; "
                             "writing there would delete the source")
        if source in dst.parents:
            raise ValueError(f"destination {str(dst)!r} is inside the source checkpoint {str(source)!r}, "
                             "which is never modified")
    if dst.exists() and not overwrite and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"destination {str(dst)!r} exists and is not empty (pass --overwrite to replace it)")
    parent = next(p for p in dst.parents if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OSError(f"destination {str(dst)!r} cannot be created: {str(parent)!r} is not a writable folder")
    return dst


def compress_checkpoint(src: str | pathlib.Path, dst: str | pathlib.Path, recipe: _recipe.Recipe | _recipe.Auto, *,
                        calibration: str | pathlib.Path | None = None, samples: int = 128, length: int = 128,
                        export_hf: bool = False, export: str | None = None, overwrite: bool = False,
                        mesh: Any = None, progress: bool = True, print_fn: Callable[[str], None] = print,
                        resume: bool = False, profile: bool = False) -> Outcome:
    """Loads, calibrates, compresses, evaluates and writes one checkpoint (see the module docstring).

    Args:
      src: a Hugging Face-layout directory (``config.json`` + ``model.safetensors`` or a sharded index).
      dst: the output folder; it must not exist or be empty unless ``overwrite``.
      recipe: what to do per layer (e.g. ``jb.recipe.preset("gptq-int4")``), or ``jb.recipe.Auto(bits=...)``:
        bits per layer chosen by :func:`jaxopt_big.oneshot.auto` on the calibration batches (report.md
        and the printed lines give the average bits per weight achieved). A recipe's ``rotate`` rotates a
        decoder first (:func:`jaxopt_big.zoo.rotate`, random Hadamard with signs from
        :data:`ROTATION_SEED`); with ``Rotate.ONLINE`` (online Hadamard) ``export_hf`` and ``export``
        are refused, since other tools would compute something else.
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
      resume: continue the newest partial folder a killed (or interrupted) run of the same source,
        recipe and calibration left: its finished blocks are not compressed again, and the result is
        the uninterrupted run's. Every run saves each finished block there (atomically).
      profile: print a line per phase with its seconds, then the time per block and the peak
        resident memory of the process.

    Raises:
      FileNotFoundError, FileExistsError, ValueError: bad source, destination, recipe or text;
      OSError: the disk filled up (``dst`` is then absent or untouched).
    """
    started, clock = time.perf_counter(), dict[str, float]()
    src, kind = pathlib.Path(src), model_type(src)
    dst = check_destination(dst, overwrite=overwrite, src=src)
    if not isinstance(recipe, (_recipe.Recipe, _recipe.Auto)):
        raise TypeError(f"compress_checkpoint needs a jb.Recipe or jb.recipe.Auto, got {type(recipe).__name__}")
    rotate = recipe.rotate if isinstance(recipe, _recipe.Recipe) else None
    _check_rotation(rotate, kind, export_hf, export)
    key = _run_key(src, recipe, calibration, samples, length)
    tmp, finished = _start_partial(dst, key, resume, print_fn)
    try:
        with _timer(clock, "load"):
            job = _prepare(src, kind, _texts(calibration), samples, length, rotate)
            stored_bytes, stored_dtype = _stored(src)
            params, metric = job.params, job.metric
            _check_finite(src, params)
        auto = recipe if isinstance(recipe, _recipe.Auto) else None
        if isinstance(recipe, _recipe.Auto):
            with _timer(clock, "measure"):
                recipe = _oneshot.auto(job.model, params, job.batches, recipe, mesh=mesh, progress=progress,
                                       row_mask=lambda b: b.weights)[0]
        if export is not None:  # a spec the format cannot hold fails now, not after the compression
            _export.check(export, job.params, recipe)
        with _timer(clock, "evaluate"):
            before = job.evaluate(params)
        store = _BlockStore(tmp / _BLOCKS)
        compressed, layer_report = _oneshot.compress(job.model, params, job.batches, recipe, mesh=mesh,
                                                     progress=progress, row_mask=lambda b: b.weights,
                                                     on_block=store.save, finished=finished)
        for phase, seconds in layer_report.phases.items():
            clock[phase] = clock.get(phase, 0.0) + seconds
        compressed = _as_stored(compressed, stored_dtype)
        if mesh is not None:  # on the host: a checkpoint saved from a mesh would restore only on that topology
            compressed = jax.device_get(compressed)
        with _timer(clock, "evaluate"):
            after = job.evaluate(compressed)
        summary = _report.summary(compressed, recipe=recipe)
        outcome = Outcome(kind, metric, before, after, stored_bytes, _leaves.nbytes(compressed),
                          len(layer_report.rows), dst)
        rotation = None if rotate is None else {"mode": rotate.value, "seed": ROTATION_SEED}
        notes = ([] if auto is None else [_achieved(auto, recipe, summary)]) + (
            [] if rotation is None else [f"rotated before calibration: {rotation['mode']} Hadamard "
                                         f"(jb.zoo.rotate, random signs from seed {rotation['seed']})"])
        with _timer(clock, "write"):
            _write_config(src, job.model, tmp, rotate is not None)
            with _checkpoint.Manager(tmp / "checkpoint", async_save=False) as manager:
                manager.save(0, _pure(compressed), extra={"source": str(src), "model_type": kind,
                                                          "report": summary.as_dicts(), "rotation": rotation})
            (tmp / "report.md").write_text(_markdown(src, outcome, summary, layer_report, notes))
            if auto is not None:  # the chosen bits, to compress again without measuring
                (tmp / "recipe.toml").write_text(_recipe.to_toml(recipe))
            if export_hf:
                _export_hf(job, compressed, src, tmp / "hf", stored_dtype, rotate is not None)
            if export is not None:
                _export.write(export, tmp, job.model, compressed, source=src)
            _remove(tmp / _BLOCKS)
            _place_result(tmp, dst)
    except OSError as e:
        _remove(tmp)
        if e.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"disk full while writing {dst} (nothing was left there)") from None
        raise
    except Exception:
        _remove(tmp)
        raise
    except BaseException:  # interrupted: finished blocks stay for --resume (a run without it removes them)
        if not any((tmp / _BLOCKS).glob("*.pkl")):
            _remove(tmp)
        raise
    better = "lower is better" if metric == "perplexity" else "to the original model"
    print_fn(f"{metric} ({better}): {before:.4g} -> {after:.4g}")
    print_fn(f"bytes: {outcome.dense_bytes:,} -> {outcome.compressed_bytes:,} "
             f"({outcome.dense_bytes / max(outcome.compressed_bytes, 1):.2f}x); {outcome.layers} layers compressed")
    for note in notes:
        print_fn(note)
    print_fn(f"wrote {dst}")
    if profile:
        for phase in _PHASES:
            print_fn(f"profile: {phase:<9} {clock.get(phase, 0.0):8.2f} s")
        total = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        print_fn(f"profile: {total:.1f} s in all, {total / max(layer_report.blocks, 1):.2f} s per block "
                 f"({layer_report.blocks} blocks), peak resident memory {peak:,.0f} MiB")
    return outcome


_PHASES = ("load", "measure", "evaluate", "capture", "calibrate", "solve", "propagate", "assemble", "write")
_BLOCKS = "blocks"  # inside the partial folder: one file per finished block, and the run's key


@contextlib.contextmanager
def _timer(clock: dict[str, float], phase: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        clock[phase] = clock.get(phase, 0.0) + time.perf_counter() - start


def _run_key(src: pathlib.Path, recipe: _recipe.Recipe | _recipe.Auto, calibration: Any, samples: int,
             length: int) -> str:
    """What a run's finished blocks depend on: a resumed run must match it."""
    stat = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(src.glob("*.safetensors*"))]
    return repr((str(src.resolve()), stat, repr(recipe), str(calibration), samples, length))


class _BlockStore:
    """Finished blocks of a run, one file each, written atomically (a temporary name, then a rename)."""

    def __init__(self, directory: pathlib.Path):
        self.directory = directory

    def save(self, name: str, leaves: dict[str, Any], rows: tuple) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        file = self.directory / f"{name.replace('/', '.')}.pkl"
        part = file.with_suffix(".tmp")
        with part.open("wb") as stream:
            pickle.dump((name, jax.device_get(leaves), rows), stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(part, file)

    def load(self) -> dict[str, tuple[dict[str, Any], tuple]]:
        out = {}
        for file in sorted(self.directory.glob("*.pkl")):
            with file.open("rb") as stream:
                name, leaves, rows = pickle.load(stream)  # our own files, in our own hidden folder
            out[name] = (leaves, rows)
        return out


def _start_partial(dst: pathlib.Path, key: str, resume: bool, print_fn: Callable[[str], None]
                   ) -> tuple[pathlib.Path, dict[str, tuple[dict[str, Any], tuple]] | None]:
    """This run's hidden partial folder (marked with the run's ``key``), and the finished blocks to
    resume from (None: a fresh start).

    With ``resume``, the newest partial folder of a dead run with the same key is taken over; every
    other one of a dead run is removed, with a line saying so.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _partial(dst)  # this process's own: left by an interrupted call in this process (a notebook)
    stale = _stale_partials(dst)
    adopted = None
    if resume:
        for candidate in sorted(stale + [tmp] * tmp.exists(), key=lambda p: p.stat().st_mtime, reverse=True):
            key_file = candidate / _BLOCKS / "run.key"
            if key_file.is_file() and key_file.read_text() == key:
                adopted = candidate
                break
    if adopted != tmp:
        _remove(tmp)
    for p in stale:
        if p != adopted:
            _remove(p)
            print_fn(f"removed {p}, left by an earlier run that did not finish")
    if adopted is None:
        (tmp / _BLOCKS).mkdir(parents=True)
    elif adopted != tmp:
        adopted.rename(tmp)
    (tmp / _BLOCKS / "run.key").write_text(key)
    if not resume:
        return tmp, None
    finished = _BlockStore(tmp / _BLOCKS).load()
    print_fn(f"resuming {dst}: {len(finished)} finished block{'s' * (len(finished) != 1)}" if adopted else
             f"nothing to resume for {dst}: starting from the first block")
    return tmp, finished


def _export_hf(job: _Prepared, compressed: Any, src: pathlib.Path, directory: pathlib.Path, dtype: np.dtype,
               rotated: bool) -> None:
    """The dequantized weights in the source layout and dtype, with the source's config.json (the export
    changes none of its fields but a rotation's untied head) and tokenizer files."""
    job.export(compressed, directory)
    _recast(directory / "model.safetensors", dtype)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy(src / name, directory / name)
    _write_config(src, job.model, directory, rotated)


def _check_rotation(rotate: _recipe.Rotate | None, kind: str, export_hf: bool, export: str | None) -> None:
    """Refuses a rotation of an encoder, and exports other tools read of a model with an online Hadamard."""
    if rotate is None:
        return
    if kind not in DECODERS:
        raise ValueError(f"rotate: only decoders ({', '.join(DECODERS)}) can be rotated, not {kind!r}")
    wanted = [w for w, on in (("--export-hf", export_hf), (f"--export {export}", export is not None)) if on]
    if rotate is _recipe.Rotate.ONLINE and wanted:
        raise ValueError(f"{' and '.join(wanted)}: the rotated model runs an online Hadamard before down_proj, "
                         "which other tools do not run (they would compute something else); use --rotate offline "
                         "(rotate = \"offline\" in a recipe file) for a model every export can write")


def _write_config(src: pathlib.Path, model: Any, directory: pathlib.Path, rotated: bool) -> None:
    """The source's ``config.json``; a rotated model's says what the rotation changed: an untied head,
    and our own keys (``jaxopt_big_online_hadamard``, which only our loaders read)."""
    if not rotated:
        shutil.copy(src / "config.json", directory / "config.json")
        return
    config = json.loads((src / "config.json").read_text())
    ours = model.config.to_hf()
    config.update({k: v for k, v in ours.items() if k == "tie_word_embeddings" or k.startswith("jaxopt_big_")})
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")


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


def _achieved(auto: _recipe.Auto, recipe: _recipe.Recipe, summary: _report.Report) -> str:
    """The average bits per weight the auto recipe achieved, and how many layers got each width."""
    rows = [r for r in summary.rows if r.planned]  # the auto recipe's layers (the head rule plans nothing)
    widths = [rule.value.quantizer.spec.bits for rule in recipe.rules if rule.value is not None]
    counts = ", ".join(f"{widths.count(b)} at {b}" for b in sorted(set(widths)))
    average = 8 * sum(r.nbytes for r in rows) / max(sum(r.params for r in rows), 1)
    return (f"auto: {average:.4g} bits per weight achieved for {auto.bits:g} asked (scales included) over "
            f"{len(rows)} layers: {counts} bits")


def _markdown(src: pathlib.Path, o: Outcome, summary: _report.Report, layers: Any, notes: list[str]) -> str:
    return "\n".join([
        f"# {src.name} ({o.model_type}), compressed", "",
        f"- {o.metric}: {o.before:.4g} before, {o.after:.4g} after",
        f"- bytes: {o.dense_bytes:,} before, {o.compressed_bytes:,} after "
        f"({o.dense_bytes / max(o.compressed_bytes, 1):.2f}x)", *(f"- {n}" for n in notes), "",
        "## Per leaf: kind, bits, sparsity, bytes, plan", "", summary.to_markdown(), "",
        "## Per layer: relative output error on the calibration inputs", "", layers.to_markdown(), ""])
