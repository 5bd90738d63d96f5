"""The rewrite families: one module each in this package, one record each in the registry every front end reads.

A family module declares its config (a frozen `RuleConfig` subclass) and calls `register(...)` once. From
that record `rl.rewrite` and the torch.compile backend build the torch rules, `rewrite_onnx` its ONNX-file
rule (or reports the family's stated reason for having none), `to_onnx` the translations of its ops,
`relinear.testing` its exactly-structured weights, and the tests their parametrization. Modules in this
package are found by listing it: adding a family is adding one module (and its tests). docs/adding_a_family.md
walks through one.

Heavy imports (onnxscript, the ONNX lowering) stay inside the functions a record names, so importing
`relinear` does not load them.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from relinear.recipe import RuleConfig


@dataclass(frozen=True)
class NotInOnnx:
    """The explicit answer of a family that has no ONNX form: why its sites stay as they are in ONNX files."""

    reason: str


@dataclass(frozen=True, kw_only=True)
class DenseForm:
    """The math of a dense-layer family (y = x @ W.T + b -> a structured or sparse form); the generic dense
    rule (`relinear.passes.dense`) and ONNX rewrite (`relinear.export.dense`) read it.

    `fit`, `dense` and `cost` come from `relinear/approx`, so both front ends fit the same factors.
    """

    knob: str  # the config field that sets the size, e.g. "nblocks"
    settings: Callable[[RuleConfig, torch.Tensor], list]  # the knob's values to try for a weight, cheapest first
    sizes: Callable[[int, int], Sequence]  # every valid knob value for a weight [out, in] (test strategies)
    fit: Callable[[torch.Tensor, object], tuple[torch.Tensor, ...]]  # (W [out, in], setting) -> factors
    dense: Callable[[tuple, int, int], torch.Tensor]  # (factors, in, out) -> the W' they stand for
    cost: Callable[[int, int, object], tuple[int, int]]  # (in, out, setting) -> (params, FLOPs per token)
    op: str  # torch.ops.relinear.<op>(x, *factors, bias, *scalars)
    # The op's arguments that distillation trains (`rl.calibrate`), by their schema names: the free float
    # factors. Index tensors (a sparse form's kept positions) are buffers and never train, so a pruned entry
    # stays exactly zero; the site's bias trains too (the dense rule owns it).
    trains: tuple[str, ...]
    takes_out_features: bool = True  # the op's scalars are (out_features,), else none (unless `scalars`)
    # (op builder, x, stored factors, factors, in, out) -> x @ W'^T in ONNX ops; stored: see `store`
    lowering: Callable | NotInOnnx
    # What the fit reads of the layer's inputs for a config: "" (nothing), "norms" (per-feature norms, e.g.
    # Wanda) or "gram" (X^T X, e.g. whitening). A fit that reads them is called fit(W, setting, InputStats).
    inputs: Callable[[RuleConfig], str] = lambda cfg: ""
    # (factors, out_features) -> the op's arguments after the bias; None: (out_features,) if takes_out_features
    scalars: Callable[[tuple, int], tuple] | None = None
    # (factors, in, out) -> the tensors an ONNX file stores (index tensors stay integers); None: each factor
    # transposed in its last two dims, for MatMul
    store: Callable[[tuple, int, int], tuple] | None = None
    # (out, in, setting, seed) -> a float64 weight exactly of the form (test strategies); None: random factors
    # of the fit's shapes multiplied out by `dense`, which suits forms whose factors are all free floats
    structured: Callable[[int, int, object, int], torch.Tensor] | None = None

    def torch_op(self):
        return getattr(torch.ops.relinear, self.op).default

    def op_scalars(self, factors, out_features: int) -> tuple:
        if self.scalars is not None:
            return tuple(self.scalars(factors, out_features))
        return (out_features,) if self.takes_out_features else ()

    def call(self, x, factors, bias, out_features: int):
        return self.torch_op()(x, *factors, bias, *self.op_scalars(factors, out_features))

    def stored(self, factors, in_features: int, out_features: int) -> tuple:
        if self.store is not None:
            return tuple(self.store(factors, in_features, out_features))
        return tuple(f.transpose(-1, -2) for f in factors)


@dataclass(frozen=True, kw_only=True)
class Family:
    """One rewrite family. `torch_rules`, `onnx_rules` and `translations` name "module:function" targets or
    callables; strings are imported when first used."""

    config: type[RuleConfig]
    example: RuleConfig  # a small setting the contract tests run through every front end
    torch_rules: Callable[[RuleConfig], list] | str  # config -> engine Rules
    onnx_rules: Callable | str | NotInOnnx  # (config, report, causal masks, on_site) -> object with .rules()
    translations: Mapping[str, Callable | str] = field(default_factory=dict)  # op name -> to_onnx translation
    kernels: tuple[str, ...] = ()  # modules whose import registers the family's ops
    dense: DenseForm | None = None  # set for dense-layer families

    @property
    def name(self) -> str:
        return self.config.name

    def rules(self, config: RuleConfig) -> list:
        """The engine rules for `config`, each carrying the config whose budgets the engine applies."""
        self.load_kernels()
        return [dataclasses.replace(rule, config=config) for rule in resolve(self.torch_rules)(config)]

    def load_kernels(self) -> None:
        for module in self.kernels:
            importlib.import_module(module)


def dense_family(config: type[RuleConfig], example: RuleConfig, form: DenseForm, *, kernels: tuple[str, ...],
                 translation: Callable | str | NotInOnnx) -> Family:
    """A dense-layer family: the generic dense rules in both front ends, its op's translation for `to_onnx`."""
    if isinstance(form.lowering, NotInOnnx):
        onnx_rules = form.lowering
    else:
        onnx_rules = "relinear.export.dense:DenseRules"
    translations = {} if isinstance(translation, NotInOnnx) else {form.op: translation}
    return Family(config=config, example=example, torch_rules="relinear.passes.dense:dense_rules",
                  onnx_rules=onnx_rules, translations=translations, kernels=kernels, dense=form)


def resolve(target: Callable | str) -> Callable:
    """A callable, or the function a "module:function" string names."""
    if callable(target):
        return target
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


_REGISTRY: dict[str, Family] = {}
_loaded = False


def register(family: Family) -> Family:
    """Add a family; its config's `name` must be new (a second module claiming a name is a mistake)."""
    name = family.config.name
    if not name:
        raise ValueError(f"{family.config.__name__}: a family's config needs a class attribute `name`")
    if name in _REGISTRY and _REGISTRY[name].config is not family.config:
        raise ValueError(f"two families are named {name!r}: {_REGISTRY[name].config} and {family.config}")
    if not isinstance(family.example, family.config):
        raise TypeError(f"{name}: example must be a {family.config.__name__}, got {family.example!r}")
    _REGISTRY[name] = family
    return family


def families() -> list[Family]:
    """Every registered family, the modules of this package imported on first call."""
    global _loaded
    if not _loaded:
        _loaded = True
        for module in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{module.name}")
    return list(_REGISTRY.values())


def family_of(config: RuleConfig) -> Family:
    for family in families():
        if type(config) is family.config:
            return family
    raise TypeError(f"no rewrite family is registered for {type(config).__name__}")
