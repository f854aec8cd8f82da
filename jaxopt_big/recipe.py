"""Recipes: one per-layer compression plan across techniques, read by every consumer.

A :class:`Recipe` is a list of :class:`jaxopt_big.tree.Rule` whose values are :class:`Plan` s. The
same recipe drives post-training compression of a parameter tree (:meth:`Recipe.plans` gives the
plan of each leaf), the block-wise one-shot engine (:func:`jaxopt_big.oneshot.compress`),
training-time compression, and the report (planned vs achieved). This is the only layer above the
technique packages: it imports several of them, they never import it.

Methods are part of the plan. A plain sparsity (``0.5`` or ``NM(2, 4)``) prunes by magnitude; wrap it
as ``Wanda(...)`` or ``SparseGPT(...)`` to use calibration data. A plain ``QuantSpec`` rounds to
nearest (``RTN``); ``GPTQ(spec)`` quantizes with second-order error feedback.

Examples:
  >>> import jaxopt_big as jb
  >>> from jaxopt_big.tree import Rule
  >>> int4 = jb.quant.QuantSpec(bits=4, granularity=jb.quant.Group(128))
  >>> recipe = jb.Recipe([
  ...     Rule(r"layer_\\d+/mlp/.*", jb.Plan(sparsity=jb.SparseGPT(jb.sparsity.NM(2, 4)), quant=jb.GPTQ(int4))),
  ...     Rule(r".*", jb.Plan(quant=jb.quant.QuantSpec(bits=8, granularity=jb.quant.PER_CHANNEL))),
  ... ])
  >>> recipe.rules[1].value.quantizer
  RTN(spec=QuantSpec(bits=8, ...))
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import optax

from jaxopt_big import _checks
from jaxopt_big import quant as _quant
from jaxopt_big import sparsity as _sparsity
from jaxopt_big import tree as _tree

__all__ = ["Plan", "Recipe", "Magnitude", "Wanda", "SparseGPT", "RTN", "GPTQ", "PRESETS", "preset", "load",
           "RecipeFileError"]

Sparsity = float | _sparsity.NM


def _check_sparsity(owner: str, value: Any) -> Any:
    if isinstance(value, _sparsity.NM):
        return value
    return _checks.fraction(f"{owner}.sparsity (a fraction or NM(n, m))", value)


def _check_damp(owner: str, damp: Any) -> float:
    return _checks.fraction(f"{owner}.damp", damp, open_low=True)


@dataclasses.dataclass(frozen=True)
class Magnitude:
    """Prune the smallest weights (no calibration data needed)."""

    sparsity: Sparsity

    def __post_init__(self):
        _checks.store(self, sparsity=_check_sparsity("Magnitude", self.sparsity))


@dataclasses.dataclass(frozen=True)
class Wanda:
    """Prune by |weight| x input-activation norm, per output (Sun et al., 2023)."""

    sparsity: Sparsity

    def __post_init__(self):
        _checks.store(self, sparsity=_check_sparsity("Wanda", self.sparsity))


@dataclasses.dataclass(frozen=True)
class SparseGPT:
    """Prune with second-order error feedback on the input Hessian (Frantar & Alistarh, 2023)."""

    sparsity: Sparsity
    block_size: int = 128
    damp: float = 0.01

    def __post_init__(self):
        _checks.store(self, sparsity=_check_sparsity("SparseGPT", self.sparsity),
                      block_size=_checks.integer("SparseGPT.block_size", self.block_size, low=1),
                      damp=_check_damp("SparseGPT", self.damp))


@dataclasses.dataclass(frozen=True)
class RTN:
    """Round each weight to its nearest grid point (the spec's calibration picks the grid)."""

    spec: _quant.Format

    def __post_init__(self):
        if not isinstance(self.spec, _quant.Format):
            raise TypeError(f"RTN needs a QuantSpec or another Format, got {self.spec!r}")


@dataclasses.dataclass(frozen=True)
class GPTQ:
    """Quantize column by column with second-order error feedback (Frantar et al., 2022)."""

    spec: _quant.QuantSpec
    act_order: bool = False
    block_size: int = 128
    damp: float = 0.01

    def __post_init__(self):
        if not isinstance(self.spec, _quant.QuantSpec):
            raise TypeError(f"GPTQ needs an integer QuantSpec, got {self.spec!r}")
        _checks.store(self, act_order=_checks.flag("GPTQ.act_order", self.act_order),
                      block_size=_checks.integer("GPTQ.block_size", self.block_size, low=1),
                      damp=_check_damp("GPTQ", self.damp))


Pruner = Magnitude | Wanda | SparseGPT
Quantizer = RTN | GPTQ


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """What to do with one layer's kernel: prune, then quantize the survivors (either may be None).

    Attributes:
      sparsity: a fraction, ``NM(n, m)`` (magnitude pruning), or a method: ``Magnitude``, ``Wanda``,
        ``SparseGPT``.
      quant: a ``QuantSpec`` / other ``Format`` (round to nearest), or ``RTN(spec)`` / ``GPTQ(spec)``.
    """

    sparsity: Sparsity | Pruner | None = None
    quant: _quant.Format | Quantizer | None = None

    def __post_init__(self):
        if self.sparsity is not None and not isinstance(self.sparsity, Pruner):
            _checks.store(self, sparsity=_check_sparsity("Plan", self.sparsity))
        if self.quant is not None and not isinstance(self.quant, (_quant.Format, RTN, GPTQ)):
            raise TypeError(f"Plan.quant must be a QuantSpec, Format, RTN or GPTQ, got {self.quant!r}")

    @property
    def pruner(self) -> Pruner | None:
        """The pruning method, with plain fractions and N:M read as magnitude pruning."""
        if self.sparsity is None or isinstance(self.sparsity, Pruner):
            return self.sparsity
        return Magnitude(self.sparsity)

    @property
    def quantizer(self) -> Quantizer | None:
        """The quantization method, with a plain spec read as round-to-nearest."""
        if self.quant is None or isinstance(self.quant, Quantizer):
            return self.quant
        return RTN(self.quant)

    def describe(self) -> str:
        """A short label for the report, e.g. ``sparsegpt 2:4 + gptq int4 g128``.

        Examples:
          >>> from jaxopt_big import quant
          >>> Plan(sparsity=0.5, quant=quant.QuantSpec(bits=4, granularity=quant.Group(128))).describe()
          'magnitude 50% + rtn int4 g128'
        """
        parts = []
        if self.pruner is not None:
            s = self.pruner.sparsity
            amount = f"{s.n}:{s.m}" if isinstance(s, _sparsity.NM) else f"{float(s):.0%}"
            parts.append(f"{type(self.pruner).__name__.lower()} {amount}")
        if self.quantizer is not None:
            spec = self.quantizer.spec
            grid = f"int{spec.bits}" if isinstance(spec, _quant.QuantSpec) else type(spec).__name__.lower()
            granularity = getattr(spec, "granularity", None)
            if isinstance(granularity, _quant.Group):
                grid += f" g{granularity.size}"
            parts.append(f"{type(self.quantizer).__name__.lower()} {grid}")
        return " + ".join(parts) or "dense"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Per-layer plans: first matching rule wins; kernels no rule claims stay as they are.

    Attributes:
      rules: ``[Rule(pattern, Plan(...)), ...]`` with the semantics of :mod:`jaxopt_big.tree`.
      where: the candidate leaves (default: kernels).
    """

    rules: Sequence[_tree.Rule]
    where: Any = _tree.KERNELS

    def __post_init__(self):
        rules = tuple(self.rules) if isinstance(self.rules, (list, tuple)) else self.rules
        if not _tree.is_rules(rules) or not all(isinstance(r.value, Plan | None) for r in rules):
            raise TypeError(f"Recipe needs a non-empty list of Rule(pattern, Plan(...)), got {self.rules!r}")
        _checks.store(self, rules=rules)

    def plans(self, params: Any) -> Any:
        """The :class:`Plan` of every leaf of ``params`` (``None`` where none applies)."""
        return _tree.assign(params, list(self.rules), where=self.where, what="recipe")

    def _planned(self, params: Any, plans: Any = None) -> list[tuple[str, Plan]]:
        flat = jax.tree.leaves(self.plans(params) if plans is None else plans, is_leaf=lambda v: v is None)
        return [(p, plan) for p, plan in zip(_tree.paths(params), flat) if plan is not None]

    def apply(self, params: Any) -> Any:
        """Post-training compression without calibration data: magnitude pruning, then round to nearest.

        A pruned and quantized kernel is quantized with its zeros in place; at 8 bits it is stored as one
        leaf whose codes are packed sparse (mask bits + kept int8 codes + scales). Plans that need
        calibration data (Wanda, SparseGPT, GPTQ) raise: run them with
        :func:`jaxopt_big.oneshot.compress`.

        Examples:
          >>> import jax, jaxopt_big as jb
          >>> params = {"d": {"kernel": jax.random.normal(jax.random.key(0), (8, 4))}}
          >>> out = jb.Recipe([jb.Rule(".*", jb.Plan(sparsity=0.5, quant=jb.quant.QuantSpec(bits=8)))]).apply(params)
          >>> out["d"]["kernel"].kind, float((out["d"]["kernel"].dense() == 0).mean())
          ('int8 sparse 50%', 0.5)
        """
        plans = self.plans(params)
        for path, plan in self._planned(params, plans):
            for method in (plan.pruner, plan.quantizer):
                if method is not None and not isinstance(method, (Magnitude, RTN)):
                    raise ValueError(f"{path}: {type(method).__name__} needs calibration data; "
                                     "use jb.oneshot.compress(model, params, batches, recipe)")

        def one(path: str, w: Any, plan: Plan) -> Any:
            keep = None
            if plan.pruner is not None:
                keep = _prune_masks({"w": w}, plan.pruner.sparsity)["w"]
                w = _sparsity.apply_masks({"w": w}, {"w": keep})["w"]
            if plan.quantizer is None:
                return w
            q = _quant.quantize(w, plan.quantizer.spec, path=path)
            if keep is not None and getattr(q, "bits", None) == 8:  # one leaf: mask bits + kept int8 codes + scales
                return _sparsity.pack_array(q, keep)
            return q

        return _tree.map_with_path(lambda p, w, plan: w if plan is None else one(p, w, plan), params, plans)

    def for_training(self, tx: optax.GradientTransformation, apply_fn: Callable[..., Any], params: Any, *,
                     ramp: optax.Schedule | None = None, update_every: int = 100
                     ) -> tuple[optax.GradientTransformationExtraArgs, Callable[..., Any]]:
        """Training-time compression around YOUR optimizer: ``(tx, forward)``.

        ``tx`` prunes each planned kernel to its plan's sparsity by magnitude (one
        :func:`jaxopt_big.sparsity.prune` wrapper per distinct sparsity/structure) and ``forward``
        runs ``apply_fn(params, *args)`` on fake-quantized kernels (straight-through gradients), so
        the model trains towards what :meth:`apply` will store. Calibration methods train as their
        data-free counterparts (Wanda/SparseGPT as magnitude, GPTQ as round to nearest).

        Args:
          tx: your optax transform.
          apply_fn: ``(params, *args) -> outputs``.
          params: the parameters (to resolve the rules).
          ramp: schedule of the fraction of each target sparsity reached at a step (e.g.
            ``jb.sparsity.polynomial_schedule(final_sparsity=1.0, ...)``); None: the target from step 0.
          update_every: mask update period (see :func:`jaxopt_big.sparsity.prune`).

        Examples:
          >>> import jax, optax, jaxopt_big as jb
          >>> params = {"d": {"kernel": jax.random.normal(jax.random.key(0), (8, 4))}}
          >>> recipe = jb.Recipe([jb.Rule("d", jb.Plan(sparsity=0.75, quant=jb.quant.QuantSpec(bits=4)))])
          >>> tx, forward = recipe.for_training(optax.sgd(0.1), lambda p, x: x @ p["d"]["kernel"], params)
          >>> grads = jax.grad(lambda p: forward(p, jax.numpy.ones((1, 8))).sum())(params)
          >>> updates, _ = tx.update(grads, tx.init(params), params)
          >>> float((optax.apply_updates(params, updates)["d"]["kernel"] == 0).mean())
          0.75
        """
        groups: dict[Any, list[str]] = {}
        quant: dict[Any, list[str]] = {}
        for path, plan in self._planned(params):
            if plan.pruner is not None:
                groups.setdefault(plan.pruner.sparsity, []).append(path)
            if plan.quantizer is not None:
                quant.setdefault(plan.quantizer.spec, []).append(path)
        for target, paths in groups.items():
            structure = target if isinstance(target, _sparsity.NM) else _sparsity.Unstructured()
            fraction = 1.0 - target.n / target.m if isinstance(target, _sparsity.NM) else float(target)
            sparsity = fraction if ramp is None else (lambda step, f=fraction: f * ramp(step))
            tx = _sparsity.prune(tx, sparsity=sparsity, structure=structure, update_every=update_every,
                                 where=_only(paths))

        def forward(p: Any, *args: Any, **kwargs: Any) -> Any:
            for spec, paths in quant.items():
                p = _quant.fake_quant_params(p, spec, where=_only(paths))
            return apply_fn(p, *args, **kwargs)

        return optax.with_extra_args_support(tx), forward


def _only(paths: Sequence[str]) -> Callable[[str, Any], bool]:
    """A ``where`` that selects exactly these leaf paths."""
    chosen = frozenset(paths)
    return lambda path, leaf: path in chosen


def _prune_masks(tree: Any, target: Sparsity) -> Any:
    if isinstance(target, _sparsity.NM):
        return _sparsity.make_masks(_sparsity.magnitude(tree), None, where=".*", structure=target)
    return _sparsity.make_masks(_sparsity.magnitude(tree), float(target), where=".*")


def _group128(bits: int) -> _quant.QuantSpec:
    return _quant.QuantSpec(bits=bits, granularity=_quant.Group(128), calibration=_quant.MSE())


# GGUF's Q4_0 / Q8_0 grids: symmetric codes (int4 full range -8..7), one float16 scale per 32 inputs,
# so jb.export.gguf writes them exactly.
_Q4_0 = _quant.QuantSpec(bits=4, granularity=_quant.Group(32), calibration=_quant.MSE(), scale_dtype="float16")
_Q8_0 = _quant.QuantSpec(bits=8, granularity=_quant.Group(32), scale_dtype="float16")


# Kernels of decoder and encoder linears; the output head and embeddings stay dense in every preset.
_HEAD = _tree.Rule(r"(.*/)?(lm_head|embed_tokens|embeddings?|wte|pooler)(/.*)?", None, required=False)
PRESETS: dict[str, tuple[Plan, str]] = {
    "gptq-int4": (Plan(quant=GPTQ(_group128(4))), "GPTQ int4, groups of 128, MSE grid"),
    "gptq-int3": (Plan(quant=GPTQ(_group128(3))), "GPTQ int3, groups of 128, MSE grid"),
    "rtn-int4": (Plan(quant=_group128(4)), "round to nearest int4, groups of 128, MSE grid"),
    "int8": (Plan(quant=_quant.QuantSpec(bits=8, granularity=_quant.PER_CHANNEL)), "int8 per output channel"),
    "gptq-q4_0": (Plan(quant=GPTQ(_Q4_0)), "GPTQ int4, groups of 32, float16 scales: GGUF Q4_0 exactly"),
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


_RULE_KEYS = {"pattern", "sparsity", "prune", "quant", "required"}
_QUANT_KEYS = {"bits", "symmetric", "granularity", "group", "calibration", "method", "act_order", "damp"}
_PRUNERS = {"magnitude": Magnitude, "wanda": Wanda, "sparsegpt": SparseGPT}
_GRANULARITIES: dict[str, _quant.Granularity] = {"tensor": _quant.PER_TENSOR, "channel": _quant.PER_CHANNEL}
_CALIBRATIONS: dict[str, Callable[[], _quant.Calibration]] = {"absmax": _quant.AbsMax, "minmax": _quant.MinMax,
                                                              "mse": _quant.MSE}


class RecipeFileError(ValueError):
    """A recipe file that does not parse into a typed :class:`Recipe`; the message names file, line and key."""


class _BadKey(ValueError):
    """A bad value of the file key ``key`` (the file error points at that key's line)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


@contextlib.contextmanager
def _about(key: str) -> Iterator[None]:
    """Blames the key ``key`` for a ``TypeError``/``ValueError`` raised inside."""
    try:
        yield
    except _BadKey:
        raise
    except (TypeError, ValueError) as e:
        raise _BadKey(key, str(e)) from None


def load(path: str | Any) -> Recipe:
    """Reads a TOML recipe: ``[[rule]]`` tables of ``pattern`` -> plan, first match wins.

    Keys of a rule: ``pattern`` (regex), ``sparsity`` (a fraction or ``"2:4"``), ``prune``
    (``magnitude`` | ``wanda`` | ``sparsegpt``), ``required`` (bool) and a ``[rule.quant]`` table with
    ``bits``, ``symmetric``, ``granularity`` (``tensor`` | ``channel``) or ``group`` (size),
    ``calibration`` (``absmax`` | ``minmax`` | ``mse``), ``method`` (``rtn`` | ``gptq``), ``act_order``,
    ``damp``. A key left out means what it means in Python: ``[rule.quant]`` defaults to
    ``QuantSpec()`` (8 bits, symmetric, ``tensor``, ``absmax``) and ``method = "rtn"``, so
    ``bits = 8`` alone is ``QuantSpec(bits=8)``; ``prune`` defaults to ``magnitude``. A rule without
    ``sparsity`` or ``quant`` leaves its layers dense. Unknown keys and bad values raise
    :class:`RecipeFileError` naming the file, the line of the offending key and the key.

    Examples:
      >>> import pathlib, tempfile
      >>> f = pathlib.Path(tempfile.mkdtemp()) / "r.toml"
      >>> _ = f.write_text('[[rule]]\\npattern = "layers/.*/mlp/.*"\\nsparsity = "2:4"\\nprune = "sparsegpt"\\n'
      ...                  '[rule.quant]\\nbits = 4\\ngroup = 128\\nmethod = "gptq"\\n')
      >>> load(f).rules[0].value.describe()
      'sparsegpt 2:4 + gptq int4 g128'
      >>> _ = f.write_text('[[rule]]\\npattern = ".*"\\nsparsty = 0.5\\n')
      >>> load(f)
      Traceback (most recent call last):
      ...
      jaxopt_big.recipe.RecipeFileError: ...r.toml:3: unknown key 'sparsty' in [[rule]] (known: ...)
    """
    import pathlib
    import tomllib

    path = pathlib.Path(path)
    text = path.read_text()
    lines = text.splitlines()

    def where(key: str, start: int) -> int:
        # the key as written: `key =`, `"key" =`, in an inline table `{ a = 1, key = 2 }` or dotted `quant.key =`
        written = re.compile(rf'(?:^|[\s{{,."]){re.escape(key)}"?\s*=')
        for i in range(start, len(lines)):
            if written.search(lines[i].split("#", 1)[0]):
                return i + 1
        return start + 1

    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeFileError(f"{path}: {e}") from None
    extra = set(doc) - {"rule"}
    if extra or not isinstance(doc.get("rule"), list) or not doc["rule"]:
        raise RecipeFileError(f"{path}: a recipe file holds [[rule]] tables only"
                              + (f"; unknown top-level keys {sorted(extra)}" if extra else ""))
    # each [[rule]] header as TOML allows it (spaces inside the brackets, a comment after); a rule
    # whose header is not found here is still read, its errors then point at its first key
    header = re.compile(r"^\s*\[\[\s*rule\s*\]\]\s*(#.*)?$")
    starts = [i for i, line in enumerate(lines) if header.match(line)]
    rules = []
    for n, table in enumerate(doc["rule"]):
        start = starts[n] if n < len(starts) else 0
        try:
            rules.append(_rule_of(table))
        except _BadKey as e:
            raise RecipeFileError(f"{path}:{where(e.key, start)}: {e}") from None
    return Recipe(rules)


def _rule_of(table: dict[str, Any]) -> _tree.Rule:
    for key in table:
        if key not in _RULE_KEYS:
            raise _BadKey(key, f"unknown key {key!r} in [[rule]] (known: {', '.join(sorted(_RULE_KEYS))})")
    if "pattern" not in table:
        raise _BadKey("[[rule]]", "a [[rule]] needs a pattern")
    plan = Plan(sparsity=_sparsity_of(table), quant=_quant_of(table.get("quant")))
    with _about("required"):
        required = _checks.flag("required", table.get("required", True))
    with _about("pattern"):
        return _tree.Rule(table["pattern"], plan, required=required)


def _sparsity_of(table: dict[str, Any]) -> Any:
    value, method = table.get("sparsity"), table.get("prune", "magnitude")
    if value is None:
        if "prune" in table:
            raise _BadKey("prune", "'prune' needs a 'sparsity'")
        return None
    if method not in _PRUNERS:
        raise _BadKey("prune", f"prune must be one of {', '.join(_PRUNERS)}, got {method!r}")
    with _about("sparsity"):
        if isinstance(value, str):
            n, _, m = value.partition(":")
            if not (n.isdigit() and m.isdigit()):
                raise ValueError(f"sparsity must be a fraction or 'n:m', got {value!r}")
            value = _sparsity.NM(int(n), int(m))
        return _PRUNERS[method](value)


def _named(key: str, choices: dict[str, Any], value: Any) -> Any:
    if value not in choices:
        raise ValueError(f"{key} must be one of {', '.join(choices)}, got {value!r}")
    return choices[value]


# [rule.quant] keys that set a QuantSpec field: key -> (field, value of the field from the file's value).
_SPEC_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "bits": ("bits", lambda v: v),
    "symmetric": ("symmetric", lambda v: v),
    "granularity": ("granularity", lambda v: _named("granularity", _GRANULARITIES, v)),
    "group": ("granularity", lambda v: _quant.Group(v)),
    "calibration": ("calibration", lambda v: _named("calibration", _CALIBRATIONS, v)()),
}


def _quant_of(table: Any) -> Any:
    if table is None:
        return None
    if not isinstance(table, dict):
        raise _BadKey("quant", f"quant must be a [rule.quant] table, got {table!r}")
    for key in table:
        if key not in _QUANT_KEYS:
            raise _BadKey(key, f"unknown key {key!r} in [rule.quant] (known: {', '.join(sorted(_QUANT_KEYS))})")
    if "granularity" in table and "group" in table:
        raise _BadKey("group", "give granularity or group, not both")
    spec = _quant.QuantSpec()  # a key left out keeps QuantSpec's default
    for key, (field, read) in _SPEC_KEYS.items():
        if key in table:
            with _about(key):
                spec = dataclasses.replace(spec, **{field: read(table[key])})
    with _about("method"):
        method = _named("method", {"rtn": RTN, "gptq": GPTQ}, table.get("method", "rtn"))
    if method is RTN:
        for key in ("act_order", "damp"):
            if key in table:
                raise _BadKey(key, "act_order and damp are GPTQ options: set method = 'gptq'")
        return RTN(spec)
    quantizer = GPTQ(spec)
    for key in ("act_order", "damp"):
        if key in table:
            with _about(key):
                quantizer = dataclasses.replace(quantizer, **{key: table[key]})
    return quantizer
