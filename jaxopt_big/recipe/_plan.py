"""Plan (what to do with one kernel) and Recipe (per-layer plans by rule), with the data-free
consumers: :meth:`Recipe.apply` and :meth:`Recipe.for_training`."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax

from jaxopt_big import _checks
from jaxopt_big import quant as _quant
from jaxopt_big import sparsity as _sparsity
from jaxopt_big import tree as _tree
from jaxopt_big.recipe._methods import RTN, Magnitude, Method, Pruner, Quantizer, Sparsity, _check_sparsity

__all__ = ["Plan", "Recipe", "Rotate"]


class Rotate(enum.Enum):
    """A QuaRot-style rotation of a decoder before it is calibrated (``jb.zoo.rotate``, random Hadamard).

    ``ONLINE`` also multiplies ``down_proj``'s input by a Hadamard matrix at run time: best for low-bit
    weights and activations, but only our loaders run it. ``OFFLINE`` rotates the residual stream
    only: a plain Llama (with an untied head) that every export writes.
    """

    ONLINE = "online"
    OFFLINE = "offline"


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
        if self.quant is not None and not isinstance(self.quant, (_quant.Format, Quantizer)):
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

    @property
    def methods(self) -> tuple[Method, ...]:
        """The plan's methods in the order they run: the pruner, then the quantizer."""
        return tuple(m for m in (self.pruner, self.quantizer) if m is not None)

    def for_layer(self, path: str) -> Plan:
        """The plan as it runs on the layer named ``path``: each method's :meth:`Method.for_layer`."""
        pruner = None if self.pruner is None else self.pruner.for_layer(path)
        quantizer = None if self.quantizer is None else self.quantizer.for_layer(path)
        return self if (pruner, quantizer) == (self.pruner, self.quantizer) else Plan(sparsity=pruner, quant=quantizer)

    def describe(self) -> str:
        """A short label for the report, e.g. ``sparsegpt 2:4 + gptq int4 g128``.

        Examples:
          >>> from jaxopt_big import quant
          >>> Plan(sparsity=0.5, quant=quant.QuantSpec(bits=4, granularity=quant.Group(128))).describe()
          'magnitude 50% + rtn int4 g128'
        """
        return " + ".join(m.describe() for m in self.methods) or "dense"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Per-layer plans: first matching rule wins; kernels no rule claims stay as they are.

    Attributes:
      rules: ``[Rule(pattern, Plan(...)), ...]`` with the semantics of :mod:`jaxopt_big.tree`.
      where: the candidate leaves (default: kernels).
      rotate: rotate the decoder before calibrating it (:class:`Rotate`). Read by
        ``jb.hf.compress_checkpoint`` (and ``jaxopt-big compress``); ``jb.oneshot.compress`` and
        :meth:`apply` take the model as given, so rotate it there with ``jb.zoo.rotate`` first.
    """

    rules: Sequence[_tree.Rule]
    where: Any = _tree.KERNELS
    rotate: Rotate | None = None

    def __post_init__(self):
        rules = tuple(self.rules) if isinstance(self.rules, (list, tuple)) else self.rules
        if not _tree.is_rules(rules) or not all(isinstance(r.value, Plan | None) for r in rules):
            raise TypeError(f"Recipe needs a non-empty list of Rule(pattern, Plan(...)), got {self.rules!r}")
        _checks.store(self, rules=rules)
        if self.rotate is not None and not isinstance(self.rotate, Rotate):
            raise TypeError(f"Recipe.rotate must be a jb.recipe.Rotate or None, got {self.rotate!r}")

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
            for method in plan.methods:
                if method.needs_hessian:
                    raise ValueError(f"{path}: {type(method).__name__} needs calibration data; "
                                     "use jb.oneshot.compress(model, params, batches, recipe)")

        def one(path: str, w: Any, plan: Plan) -> Any:
            keep = None
            if plan.pruner is not None:
                keep = plan.pruner.data_free().keep(w, path)
                w = _sparsity.apply_masks({"w": w}, {"w": keep})["w"]
            if plan.quantizer is None:
                return w
            q = _quant.quantize(w, plan.quantizer.data_free().spec, path=path)
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
                groups.setdefault(plan.pruner.data_free().sparsity, []).append(path)
            if plan.quantizer is not None:
                quant.setdefault(plan.quantizer.data_free().spec, []).append(path)
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
