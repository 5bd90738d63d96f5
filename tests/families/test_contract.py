"""The family registry's contract: every registered family has each part of its record, its parts agree with
each other, and everything a record names (rule builders, ONNX rules, translations, lazy CUDA kernels) imports.
Dense forms are checked at their exact limit: a weight that already has the form is fitted exactly, and the op
computes x @ W'^T + b for the W' its `dense` says (a float64 matmul, not the op's own path)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import relinear.recipe
from relinear.families import Family, NotInOnnx, families, resolve
from relinear.kernels._library import LAZY_KERNELS
from relinear.recipe import RuleConfig, config_from_dict
from relinear.rewrite.engine import Rule
from relinear.testing.strategies import STRUCTURES, exactly_structured

FAMILIES = families()
DENSE = [f for f in FAMILIES if f.dense is not None]
BUILT_IN = {"low_rank", "monarch", "btt", "activation_approx", "linear_attention"}


def test_the_built_in_families_are_registered():
    assert BUILT_IN <= {f.name for f in FAMILIES}
    assert set(STRUCTURES) == {"dense", *(f.name for f in DENSE)}


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_every_family_has_each_part(family: Family):
    config = family.config
    assert issubclass(config, RuleConfig) and dataclasses.is_dataclass(config) and config.name
    assert config.__dataclass_params__.frozen
    assert isinstance(family.example, config)
    assert getattr(relinear.recipe, config.__name__) is config  # reachable where recipes look for it
    assert config_from_dict(family.example.to_dict()) == family.example  # recipe files can name it
    rules = family.rules(family.example)
    assert rules and all(isinstance(r, Rule) and r.name == config.name and r.config == family.example
                         for r in rules)
    if isinstance(family.onnx_rules, NotInOnnx):
        assert family.onnx_rules.reason.strip()
    else:
        assert callable(resolve(family.onnx_rules))
    for op_name, translation in family.translations.items():
        assert callable(resolve(translation))
        assert hasattr(torch.ops.relinear, op_name), f"{family.name}: translation for unknown op {op_name}"


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_every_lazy_cuda_kernel_imports(family: Family):
    """A `cuda=` target that does not import would fail on the first GPU call, where no CPU test looks."""
    family.load_kernels()
    ops = set(family.translations) | ({family.dense.op} if family.dense else set())
    for op_name in ops:
        assert op_name in LAZY_KERNELS, f"{op_name} is not declared with define_op"
        for target in LAZY_KERNELS[op_name]:
            assert callable(resolve(target)), target


@pytest.mark.parametrize("family", DENSE, ids=lambda f: f.name)
def test_dense_form_is_exact_on_a_weight_of_its_form(family: Family):
    form = family.dense
    assert form.knob in {f.name for f in dataclasses.fields(family.config)}
    assert not isinstance(form.lowering, NotInOnnx) or form.lowering.reason.strip()
    gen = torch.Generator().manual_seed(0)
    for out_features, in_features in ((9, 13), (16, 16), (5, 3)):
        assert form.settings(family.example, torch.zeros(out_features, in_features))
        for size in form.sizes(out_features, in_features):
            weight = exactly_structured(form, out_features, in_features, size, seed=size)
            factors = form.fit(weight, size)
            torch.testing.assert_close(form.dense(factors, in_features, out_features), weight,
                                       rtol=1e-9, atol=1e-9)
            params, flops = form.cost(in_features, out_features, size)
            assert params == sum(f.numel() for f in factors) and flops == 2 * params
            x = torch.randn(2, 3, in_features, generator=gen, dtype=torch.float64)
            bias = torch.randn(out_features, generator=gen, dtype=torch.float64)
            expected = x @ form.dense(factors, in_features, out_features).T + bias
            torch.testing.assert_close(form.call(x, factors, bias, out_features), expected,
                                       rtol=1e-9, atol=1e-9)


def test_a_second_family_with_a_taken_name_is_refused():
    from relinear.families import register

    first = FAMILIES[0]
    impostor = dataclasses.make_dataclass("Impostor", [], bases=(RuleConfig,), frozen=True)
    impostor.name = first.name
    with pytest.raises(ValueError, match="two families"):
        register(dataclasses.replace(first, config=impostor, example=impostor()))
