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
        for seed, size in enumerate(form.sizes(out_features, in_features)):  # sizes need not be ints
            weight = exactly_structured(form, out_features, in_features, size, seed=seed)
            factors = form.fit(weight, size)
            torch.testing.assert_close(form.dense(factors, in_features, out_features), weight,
                                       rtol=1e-9, atol=1e-9)
            params, flops = form.cost(in_features, out_features, size)
            # parameters are the floats the form stores; index tensors (sparse forms) are not parameters
            assert params == sum(f.numel() for f in factors if f.is_floating_point()) and flops == 2 * params
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


@pytest.mark.parametrize("family", DENSE, ids=lambda f: f.name)
def test_what_distillation_trains_gets_the_dense_gradient(family: Family):
    """`trains` names float factors of the op, and the op's gradient with respect to each (and to the bias) is
    the naive dense one, g^T x for y = x W'^T + b, carried back through `dense`: what `rl.calibrate` relies on."""
    form = family.dense
    family.load_kernels()
    names = [a.name for a in form.torch_op()._schema.arguments]
    factor_names = names[1:names.index("bias")]
    assert form.trains and set(form.trains) <= set(factor_names)
    gen = torch.Generator().manual_seed(0)
    out_features, in_features = 16, 12
    for seed, size in enumerate(form.sizes(out_features, in_features)):
        weight = exactly_structured(form, out_features, in_features, size, seed=seed)
        factors = tuple(f.detach().requires_grad_(f.is_floating_point()) for f in form.fit(weight, size))
        trained = [factors[factor_names.index(name)] for name in form.trains]
        assert all(t.is_floating_point() for t in trained)
        x = torch.randn(2, 3, in_features, generator=gen, dtype=torch.float64)
        bias = torch.randn(out_features, generator=gen, dtype=torch.float64, requires_grad=True)
        g = torch.randn(2, 3, out_features, generator=gen, dtype=torch.float64)
        *got, got_bias = torch.autograd.grad(form.call(x, factors, bias, out_features), [*trained, bias], g)
        dense_grad = g.reshape(-1, out_features).T @ x.reshape(-1, in_features)
        want = torch.autograd.grad(form.dense(factors, in_features, out_features), trained, dense_grad,
                                   allow_unused=True)
        for name, grad, expected in zip(form.trains, got, want, strict=True):
            expected = torch.zeros_like(grad) if expected is None else expected
            torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-9, msg=f"{family.name} {size}: {name}")
        torch.testing.assert_close(got_bias, g.sum((0, 1)), rtol=1e-9, atol=1e-9)
