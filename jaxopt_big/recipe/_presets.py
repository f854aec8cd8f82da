"""Named recipes for decoder and encoder checkpoints (``jaxopt-big compress --recipe NAME``).

:data:`PRESETS` is a plain dict ``name -> (Plan, description)``: a new preset is one entry.
:func:`with_smoothquant` turns a recipe into its SmoothQuant W8A8 form (``--smoothquant``).
"""

from __future__ import annotations

import dataclasses

from jaxopt_big import quant as _quant
from jaxopt_big import sparsity as _sparsity
from jaxopt_big import tree as _tree
from jaxopt_big.recipe._methods import AWQ, GPTQ, SmoothQuant, SparseGPT, Wanda
from jaxopt_big.recipe._plan import Plan, Recipe

__all__ = ["PRESETS", "preset", "with_smoothquant", "A8"]


def _group128(bits: int) -> _quant.QuantSpec:
    return _quant.QuantSpec(bits=bits, granularity=_quant.Group(128), calibration=_quant.MSE())


# GGUF's Q4_0 / Q8_0 grids: symmetric codes (int4 full range -8..7), one float16 scale per 32 inputs,
# so jb.export.gguf writes them exactly.
_Q4_0 = _quant.QuantSpec(bits=4, granularity=_quant.Group(32), calibration=_quant.MSE(), scale_dtype="float16")
_Q8_0 = _quant.QuantSpec(bits=8, granularity=_quant.Group(32), scale_dtype="float16")


# W8A8: int8 weights per output channel, inputs int8 per token at run time (int8 x int8 -> int32 matmuls),
# as vLLM's and compressed-tensors' W8A8 with dynamic per-token activations.
A8 = _quant.QuantSpec(bits=8, granularity=_quant.PER_TOKEN)
_W8A8 = _quant.QuantSpec(bits=8, granularity=_quant.PER_CHANNEL, activations=A8)


# Kernels of decoder and encoder linears; the output head and embeddings stay dense in every preset.
_HEAD = _tree.Rule(r"(.*/)?(lm_head|embed_tokens|embeddings?|wte|pooler)(/.*)?", None, required=False)
PRESETS: dict[str, tuple[Plan, str]] = {
    "gptq-int4": (Plan(quant=GPTQ(_group128(4))), "GPTQ int4, groups of 128, MSE grid"),
    "gptq-int3": (Plan(quant=GPTQ(_group128(3))), "GPTQ int3, groups of 128, MSE grid"),
    "rtn-int4": (Plan(quant=_group128(4)), "round to nearest int4, groups of 128, MSE grid"),
    "int8": (Plan(quant=_quant.QuantSpec(bits=8, granularity=_quant.PER_CHANNEL)), "int8 per output channel"),
    "awq-int4": (Plan(quant=AWQ(_group128(4))),
                 "AWQ scales (20-point grid, folded into the norm or linear before) and clipping search (not on "
                 "q/k), then round to nearest int4, groups of 128, MSE grid"),
    "awq+gptq-int4": (Plan(quant=AWQ(GPTQ(_group128(4)))),
                      "AWQ scales (20-point grid, folded into the norm or linear before), then GPTQ int4, groups of "
                      "128, MSE grid"),
    "w8a8": (Plan(quant=_W8A8), "W8A8: int8 per output channel, inputs int8 per token at run time (int8 matmuls)"),
    "smoothquant-int8": (Plan(quant=SmoothQuant(_W8A8, alpha=0.5)),
                         "W8A8 with SmoothQuant alpha 0.5 (activation outliers moved into the weights, folded into "
                         "the norm or linear before): int8 per output channel, inputs int8 per token at run time"),
    "gptq-q4_0": (Plan(quant=GPTQ(_Q4_0)), "GPTQ int4, groups of 32, MSE grid, float16 scales: GGUF Q4_0 exactly"),
    "q8_0": (Plan(quant=_Q8_0), "round to nearest int8, groups of 32, float16 scales: GGUF Q8_0 exactly"),
    "wanda-50": (Plan(sparsity=Wanda(0.5)), "Wanda 50% unstructured"),
    "sparsegpt-50": (Plan(sparsity=SparseGPT(0.5)), "SparseGPT 50% unstructured"),
    "sparsegpt-2:4": (Plan(sparsity=SparseGPT(_sparsity.NM(2, 4))), "SparseGPT 2:4"),
    "sparsegpt-50+gptq-int4": (Plan(sparsity=SparseGPT(0.5), quant=GPTQ(_group128(4))),
                               "SparseGPT 50%, then GPTQ int4 g128 on the survivors"),
}


def preset(name: str) -> Recipe:
    """A named recipe for decoder/encoder checkpoints (every linear but the head and embeddings).

    Examples:
      >>> preset("gptq-int4").rules[1].value.describe()
      'gptq int4 g128'
      >>> preset("gptq-int5")
      Traceback (most recent call last):
      ...
      ValueError: unknown recipe preset 'gptq-int5'; presets: gptq-int4, gptq-int3, rtn-int4, int8, ...
    """
    if name not in PRESETS:
        raise ValueError(f"unknown recipe preset {name!r}; presets: {', '.join(PRESETS)}")
    return Recipe([_HEAD, _tree.Rule(".*", PRESETS[name][0])])


def with_smoothquant(recipe: Recipe, alpha: float = 0.5) -> Recipe:
    """``recipe`` with SmoothQuant (strength ``alpha``) before each quantizer, whose layers then quantize
    their inputs to int8 per token at run time (:data:`A8`, unless a spec already has activations):
    ``int8`` becomes SmoothQuant W8A8, ``rtn-int4`` SmoothQuant W4A8. What ``jaxopt-big compress
    --smoothquant [ALPHA]`` does to its recipe.

    Raises:
      ValueError: a rule's quantizer already migrates scales (AWQ, SmoothQuant), or quantizes to a
        format that is not an integer ``QuantSpec``; no rule quantizes anything; ``alpha`` outside [0, 1].

    Examples:
      >>> r = with_smoothquant(preset("int8"), alpha=0.8)
      >>> r.rules[1].value.describe()
      'smoothquant 0.8 + rtn int8 a8'
      >>> r.rules[1].value.quantizer.spec.activations == A8
      True
      >>> with_smoothquant(preset("awq-int4"))
      Traceback (most recent call last):
      ...
      ValueError: smoothquant: rule '.*' already migrates scales (awq clip + rtn int4 g128); SmoothQuant goes on ...
    """
    rules, changed = [], 0
    for rule in recipe.rules:
        plan = rule.value
        q = None if plan is None else plan.quantizer
        if q is None:
            rules.append(rule)
            continue
        if q.migrates:
            raise ValueError(f"smoothquant: rule {rule.pattern!r} already migrates scales ({q.describe()}); "
                             "SmoothQuant goes on a recipe without AWQ or SmoothQuant")
        if not isinstance(q.spec, _quant.QuantSpec):
            raise ValueError(f"smoothquant: rule {rule.pattern!r} quantizes to {q.spec!r}, not an integer QuantSpec; "
                             "W8A8 needs integer weights")
        spec = q.spec if q.spec.activations is not None else dataclasses.replace(q.spec, activations=A8)
        inner = dataclasses.replace(q, spec=spec)
        rules.append(dataclasses.replace(rule, value=dataclasses.replace(plan, quant=SmoothQuant(inner, alpha=alpha))))
        changed += 1
    if not changed:
        raise ValueError("smoothquant: the recipe quantizes no layer (SmoothQuant goes before a quantizer)")
    return dataclasses.replace(recipe, rules=rules)
