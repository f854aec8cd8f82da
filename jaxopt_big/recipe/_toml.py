"""Recipe files: TOML ``[[rule]]`` tables read into a typed :class:`Recipe`, errors naming file, line and key."""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable, Iterator
from typing import Any

from jaxopt_big import _checks
from jaxopt_big import quant as _quant
from jaxopt_big import sparsity as _sparsity
from jaxopt_big import tree as _tree
from jaxopt_big.recipe._methods import Method, Pruner, Quantizer
from jaxopt_big.recipe._plan import Plan, Recipe, Rotate

__all__ = ["load", "RecipeFileError"]


_RULE_KEYS = {"pattern", "sparsity", "prune", "quant", "required"}
_ROTATIONS = {False: None, True: Rotate.ONLINE, "online": Rotate.ONLINE, "offline": Rotate.OFFLINE}
_GRANULARITIES: dict[str, _quant.Granularity] = {"tensor": _quant.PER_TENSOR, "channel": _quant.PER_CHANNEL}
_CALIBRATIONS: dict[str, Callable[[], _quant.Calibration]] = {"absmax": _quant.AbsMax, "minmax": _quant.MinMax,
                                                              "mse": _quant.MSE}


class RecipeFileError(ValueError):
    """A recipe file that does not parse into a typed :class:`Recipe`; the message names file, line and key."""

    __module__ = "jaxopt_big.recipe"  # raised and caught under its public name


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
    ``calibration`` (``absmax`` | ``minmax`` | ``mse``), ``method`` (a quantizer's
    name: ``rtn`` | ``gptq``, optionally after a migration and ``+``: ``awq`` = ``awq+rtn``,
    ``awq+gptq``, ``smoothquant``, ``smoothquant+gptq``) and the options of those methods (GPTQ:
    ``act_order``, ``block_size``, ``damp``; AWQ: ``grid``, ``clip``, ``max_shrink``, ``no_clip``;
    SmoothQuant: ``alpha``). A key left out
    means what it means in Python: ``[rule.quant]`` defaults to ``QuantSpec()`` (8 bits, symmetric,
    ``tensor``, ``absmax``; ``minmax`` if ``symmetric = false``) and ``method = "rtn"``, so ``bits = 8``
    alone is ``QuantSpec(bits=8)``; ``prune`` defaults to ``magnitude``. A rule without
    ``sparsity`` or ``quant`` leaves its layers dense. A top-level ``rotate = true`` (or ``"online"``,
    ``"offline"``) sets :attr:`Recipe.rotate`. Unknown keys and bad values raise
    :class:`RecipeFileError` naming the file, the line of the offending key and the key.

    Examples:
      >>> import pathlib, tempfile
      >>> f = pathlib.Path(tempfile.mkdtemp()) / "r.toml"
      >>> _ = f.write_text('[[rule]]\\npattern = "layers/.*/mlp/.*"\\nsparsity = "2:4"\\nprune = "sparsegpt"\\n'
      ...                  '[rule.quant]\\nbits = 4\\ngroup = 128\\nmethod = "gptq"\\n')
      >>> load(f).rules[0].value.describe()
      'sparsegpt 2:4 + gptq int4 g128'
      >>> _ = f.write_text('[[rule]]\\npattern = ".*"\\n[rule.quant]\\nbits = 4\\ngroup = 128\\nmethod = "awq+gptq"\\n'
      ...                  'grid = 10\\ndamp = 0.05\\n')
      >>> load(f).rules[0].value.quant
      AWQ(quant=GPTQ(spec=QuantSpec(bits=4, ...), ..., damp=0.05), grid=10, score=<AWQScore.MODULE: ...>, duo=True, ...)
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
    extra = set(doc) - {"rule", "rotate"}
    if extra or not isinstance(doc.get("rule"), list) or not doc["rule"]:
        raise RecipeFileError(f"{path}: a recipe file holds [[rule]] tables only (and a top-level rotate)"
                              + (f"; unknown top-level keys {sorted(extra)}" if extra else ""))
    rotate = doc.get("rotate", False)
    if not isinstance(rotate, (bool, str)) or rotate not in _ROTATIONS:  # bool first: 1 == True
        raise RecipeFileError(f"{path}:{where('rotate', 0)}: rotate must be true, false, 'online' or 'offline', "
                              f"got {rotate!r}")
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
    return Recipe(rules, rotate=_ROTATIONS[rotate])


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
    pruners = Pruner.named()
    if method not in pruners:
        raise _BadKey("prune", f"prune must be one of {', '.join(pruners)}, got {method!r}")
    with _about("sparsity"):
        if isinstance(value, str):
            n, _, m = value.partition(":")
            if not (n.isdigit() and m.isdigit()):
                raise ValueError(f"sparsity must be a fraction or 'n:m', got {value!r}")
            value = _sparsity.NM(int(n), int(m))
        return pruners[method](value)  # type: ignore[call-arg]  # a Pruner takes its sparsity first


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


def _options(method: type[Method]) -> list[str]:
    """The fields of a quantizer a recipe file may set besides its spec or inner quantizer (GPTQ's
    act_order, damp, ...; AWQ's grid)."""
    return [f.name for f in dataclasses.fields(method) if f.init][1:]  # type: ignore[arg-type]


def _quant_keys() -> set[str]:
    return {*_SPEC_KEYS, "method", *(k for m in Quantizer.named().values() for k in _options(m))}


def _quant_of(table: Any) -> Any:
    if table is None:
        return None
    if not isinstance(table, dict):
        raise _BadKey("quant", f"quant must be a [rule.quant] table, got {table!r}")
    known = _quant_keys()
    for key in table:
        if key not in known:
            raise _BadKey(key, f"unknown key {key!r} in [rule.quant] (known: {', '.join(sorted(known))})")
    if "granularity" in table and "group" in table:
        raise _BadKey("group", "give granularity or group, not both")
    spec = _quant.QuantSpec()  # a key left out keeps QuantSpec's default
    for key, (field, read) in _SPEC_KEYS.items():
        if key in table:
            with _about(key):
                spec = dataclasses.replace(spec, **{field: read(table[key])})
    if "calibration" not in table:  # QuantSpec's default for the grid the file asks for (minmax when affine)
        spec = dataclasses.replace(spec, calibration=None)
    with _about("method"):
        chain = _chain(table.get("method", "rtn"))
    options = {k: table[k] for k in known - {*_SPEC_KEYS, "method"} if k in table}
    for key in options:
        if not any(key in _options(m) for m in chain):
            owners = [m.name for m in Quantizer.named().values() if key in _options(m)]
            raise _BadKey(key, f"{key} is not an option of method {'+'.join(m.name for m in chain)!r}: it is one "
                               f"of the {'/'.join(o.upper() for o in owners)} options: set method = {owners[0]!r}")
    quantizer: Any = spec
    for method in reversed(chain):  # the inner quantizer first, then the migration that wraps it
        with _about("method"):
            quantizer = method(quantizer)  # type: ignore[call-arg]  # a Quantizer takes its spec (or inner) first
        for key, value in options.items():
            if key in _options(method):
                with _about(key):
                    quantizer = dataclasses.replace(quantizer, **{key: value})
    return quantizer


def _chain(method: Any) -> list[type[Method]]:
    """``"awq+gptq"`` -> ``[AWQ, GPTQ]``: quantizers that wrap another (migrations), then one that does
    not; a lone migration wraps round to nearest (``"awq"`` is ``"awq+rtn"``)."""
    names = Quantizer.named()
    parts = [_named("method", names, part) for part in str(method).split("+")] if isinstance(method, str) else [
        _named("method", names, method)]
    if parts[-1].wraps:
        parts.append(names["rtn"])
    if any(not p.wraps for p in parts[:-1]) or parts[-1].wraps:
        raise ValueError(f"method must be a quantizer ({', '.join(n for n, m in names.items() if not m.wraps)}), "
                         f"optionally after migrations and '+' ({', '.join(n for n, m in names.items() if m.wraps)}), "
                         f"got {method!r}")
    return parts
