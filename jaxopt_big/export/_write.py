"""One entry point for the command line: an export format by name, into an output folder."""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax

from jaxopt_big import leaves as _leaves
from jaxopt_big import tree as _tree
from jaxopt_big.export._compressed_tensors import compressed_tensors
from jaxopt_big.export._gguf import check_spec, gguf

__all__ = ["FORMATS", "write", "check"]

# format name -> what it becomes inside the output folder
FORMATS = {"gguf": "model.gguf", "compressed-tensors": "compressed-tensors"}


def _known(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; formats: {', '.join(FORMATS)}")


def check(fmt: str, params: Any, recipe: Any) -> None:
    """Raises, before compressing, the ValueError that exporting ``params`` compressed by ``recipe``
    (a ``jb.Recipe``) to ``fmt`` would raise for a quantization spec the format cannot hold exactly.

    Only GGUF restricts specs ahead of time; a layer's kernel is still checked when it is written.
    """
    _known(fmt)
    if fmt != "gguf":
        return
    plans = jax.tree.leaves(recipe.plans(params), is_leaf=lambda v: v is None)
    for path, leaf, plan in zip(_tree.paths(params), jax.tree.leaves(params, is_leaf=_leaves.is_compressed), plans):
        if plan is not None and plan.quantizer is not None:
            check_spec(path, plan.quantizer.spec, tuple(leaf.shape))


def write(fmt: str, directory: str | os.PathLike[str], model: Any, params: Any, *,
          source: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """Writes ``params`` of ``model`` in format ``fmt`` into ``directory`` (see :data:`FORMATS`);
    the tokenizer (and bos/eos ids) come from the checkpoint folder ``source`` when it has a
    ``tokenizer.json``. Returns the written path.

    Raises:
      ValueError: an unknown format, or a kernel the format cannot hold exactly.
    """
    _known(fmt)
    out = pathlib.Path(directory) / FORMATS[fmt]
    tokenizer = None
    if source is not None and (pathlib.Path(source) / "tokenizer.json").is_file():
        tokenizer = pathlib.Path(source) / "tokenizer.json"
    if fmt == "gguf":
        gguf(out, model, params, tokenizer=tokenizer)
    else:
        compressed_tensors(out, model, params, tokenizer=tokenizer)
    return out
