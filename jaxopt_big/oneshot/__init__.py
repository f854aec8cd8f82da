"""Block-wise one-shot compression of linen and nnx models, with cost linear in depth.

``jb.oneshot.compress(model, params, calibration_batches, recipe)`` runs each block of a deep model
alone on its captured inputs, accumulates the input Hessians of its linears, compresses them with
the recipe's methods (magnitude, Wanda, SparseGPT, RTN, GPTQ, SparseGPT then GPTQ) and feeds the
block's compressed outputs to the next block. See :func:`compress`.
"""

from jaxopt_big.oneshot._auto import auto
from jaxopt_big.oneshot._engine import LayerRow, Report, compress
from jaxopt_big.oneshot._model import is_lazy, read_lazy

__all__ = ["compress", "Report", "LayerRow", "auto", "is_lazy", "read_lazy"]
