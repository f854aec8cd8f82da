"""One entry point for the command line: an export format by name, into an output folder."""

from __future__ import annotations

import os
import pathlib
from typing import Any

from jaxopt_big.export._compressed_tensors import compressed_tensors
from jaxopt_big.export._gguf import gguf

__all__ = ["FORMATS", "write"]

# format name -> what it becomes inside the output folder
FORMATS = {"gguf": "model.gguf", "compressed-tensors": "compressed-tensors"}


def write(fmt: str, directory: str | os.PathLike[str], model: Any, params: Any, *,
          source: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """Writes ``params`` of ``model`` in format ``fmt`` into ``directory`` (see :data:`FORMATS`);
    the tokenizer (and bos/eos ids) come from the checkpoint folder ``source`` when it has a
    ``tokenizer.json``. Returns the written path.

    Raises:
      ValueError: an unknown format, or a kernel the format cannot hold exactly.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; formats: {', '.join(FORMATS)}")
    out = pathlib.Path(directory) / FORMATS[fmt]
    tokenizer = None
    if source is not None and (pathlib.Path(source) / "tokenizer.json").is_file():
        tokenizer = pathlib.Path(source) / "tokenizer.json"
    if fmt == "gguf":
        gguf(out, model, params, tokenizer=tokenizer)
    else:
        compressed_tensors(out, model, params, tokenizer=tokenizer)
    return out
