import math

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

from relinear.approx.feature_maps import FEATURE_MAPS, FeatureMap, HedgehogFeatureMap, make_feature_map

HEADS, HEAD_DIM = 2, 4


def _tensor(seed: int, *shape: int, dtype=torch.float64, std: float = 1.0) -> torch.Tensor:
    return std * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _attention_weights(phi_q: torch.Tensor, phi_k: torch.Tensor) -> torch.Tensor:
    kernel = phi_q @ phi_k.mT
    return kernel / kernel.sum(-1, keepdim=True)


@pytest.mark.property
@pytest.mark.parametrize("name", sorted(FEATURE_MAPS))
@settings(max_examples=10)
@given(seed=st.integers(0, 2**16), length=st.integers(1, 9), std=st.sampled_from([0.1, 1.0, 5.0]))
def test_map_shape_and_positive_kernel(name, seed, length, std):
    feature_map = make_feature_map(name, HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(seed))
    x = _tensor(seed, 2, HEADS, length, HEAD_DIM, dtype=torch.float32, std=std)
    y = _tensor(seed + 1, 2, HEADS, length, HEAD_DIM, dtype=torch.float32, std=std)
    phi_x, phi_y = feature_map(x), feature_map(y)
    assert phi_x.shape == (2, HEADS, length, feature_map.out_dim)
    assert torch.isfinite(phi_x).all()
    assert (phi_x @ phi_y.mT >= 0).all()
    if name != "taylor":  # taylor's features can be negative; only its kernel is positive (checked above)
        assert (phi_x >= 0).all()


@pytest.mark.property
@settings(max_examples=20)
@given(seed=st.integers(0, 2**16), std=st.sampled_from([0.1, 1.0, 3.0]))
def test_taylor_kernel_is_second_order_exp(seed, std):
    taylor = make_feature_map("taylor", HEADS, HEAD_DIM)
    x, y = _tensor(seed, 1, HEADS, 5, HEAD_DIM, std=std), _tensor(seed + 1, 1, HEADS, 5, HEAD_DIM, std=std)
    dot = x @ y.mT
    torch.testing.assert_close(taylor(x) @ taylor(y).mT, 1 + dot + dot**2 / 2, rtol=1e-12, atol=1e-12)


def test_elu_relu_softmax_match_their_definitions():
    x = _tensor(0, 1, HEADS, 7, HEAD_DIM)
    elu_plus_one = torch.where(x > 0, x + 1, x.exp())
    torch.testing.assert_close(make_feature_map("elu", HEADS, HEAD_DIM)(x), elu_plus_one)
    torch.testing.assert_close(make_feature_map("relu", HEADS, HEAD_DIM)(x), x.clamp(min=0))
    softmax = make_feature_map("softmax", HEADS, HEAD_DIM)(x)
    torch.testing.assert_close(softmax, x.exp() / x.exp().sum(-1, keepdim=True))


def test_hedgehog_is_two_softmaxes_of_a_per_head_projection():
    generator = torch.Generator().manual_seed(1)
    hedgehog = make_feature_map("hedgehog", HEADS, HEAD_DIM, feature_dim=3, generator=generator)
    assert hedgehog.out_dim == 6
    x = _tensor(0, 1, HEADS, 5, HEAD_DIM, dtype=torch.float32)
    phi = hedgehog(x)
    for head in range(HEADS):
        projected = x[0, head] @ hedgehog.weight[head]
        expected = torch.cat([projected.softmax(-1), (-projected).softmax(-1)], -1)
        torch.testing.assert_close(phi[0, head], expected)


def test_hedgehog_initialization_is_deterministic():
    def weight(seed):
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        return make_feature_map("hedgehog", HEADS, HEAD_DIM, generator=generator).weight

    torch.testing.assert_close(weight(3), weight(3))
    assert not torch.equal(weight(3), weight(4))
    torch.testing.assert_close(weight(None), weight(None))
    assert not torch.equal(weight(None)[0], weight(None)[0].new_zeros(HEAD_DIM, HEAD_DIM))


@pytest.mark.parametrize("seed", [None, 0])
def test_hedgehog_starts_closer_to_softmax_than_uniform_or_elu(seed):
    """Attention-weight error vs softmax over uniform weights' error (1.0: no better than uniform)."""
    heads, head_dim, length = 4, 32, 128
    scale = 1 / math.sqrt(head_dim)
    q, k = _tensor(10, 2, heads, length, head_dim), _tensor(11, 2, heads, length, head_dim)
    softmax = torch.softmax(scale * q @ k.mT, -1)
    uniform_error = (softmax - 1 / length).norm()

    def relative_error(name):
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        feature_map = make_feature_map(name, heads, head_dim, generator=generator).double()
        weights = _attention_weights(feature_map(q * math.sqrt(scale)), feature_map(k * math.sqrt(scale)))
        return ((weights - softmax).norm() / uniform_error).item()

    hedgehog, elu = relative_error("hedgehog"), relative_error("elu")
    assert hedgehog < 0.9, hedgehog  # measured 0.855 (identity-like start), elu 0.989
    assert hedgehog < elu - 0.05


@pytest.mark.parametrize("name", sorted(FEATURE_MAPS))
def test_gradients_match_finite_differences(name):
    feature_map = make_feature_map(name, HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(0)).double()
    x = _tensor(5, 1, HEADS, 3, HEAD_DIM).requires_grad_()
    assert torch.autograd.gradcheck(feature_map, (x,))


def test_elu_map_has_elu_gradient_at_zero():
    """elu + 1 has slope 1 at 0 (and everywhere else elu's slope), which a two-sided formula can get wrong."""
    x = torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float64, requires_grad=True)
    (got,) = torch.autograd.grad(make_feature_map("elu", 1, 3)(x).sum(), x)
    (expected,) = torch.autograd.grad(torch.nn.functional.elu(x).sum(), x)
    torch.testing.assert_close(got, expected)


def test_bad_arguments_are_rejected_by_name():
    with pytest.raises(ValueError, match="feature_map"):
        make_feature_map("cosine", HEADS, HEAD_DIM)
    with pytest.raises(ValueError, match="feature_dim"):
        make_feature_map("elu", HEADS, HEAD_DIM, feature_dim=8)
    with pytest.raises(ValueError, match="feature_dim"):
        make_feature_map("taylor", HEADS, HEAD_DIM, feature_dim=8)
    with pytest.raises(ValueError, match="head_dim"):
        make_feature_map("relu", HEADS, 0)
    assert make_feature_map("taylor", HEADS, HEAD_DIM, feature_dim=21).out_dim == 21


def test_registry_holds_feature_map_classes():
    assert set(FEATURE_MAPS) >= {"hedgehog", "elu", "relu", "softmax", "taylor"}
    assert all(issubclass(cls, FeatureMap) for cls in FEATURE_MAPS.values())


STANDARD_ONNX_OPS = {
    "MatMul",
    "Softmax",
    "Exp",
    "Min",
    "Sub",
    "Relu",
    "Concat",
    "Mul",
    "Add",
    "Reshape",
    "Unsqueeze",
    "Constant",
}


@pytest.mark.parametrize("name", sorted(FEATURE_MAPS))
def test_exports_to_standard_onnx_that_onnxruntime_runs(name):
    onnxruntime = pytest.importorskip("onnxruntime")
    feature_map = make_feature_map(name, HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(0)).eval()
    x = _tensor(0, 1, HEADS, 3, HEAD_DIM, dtype=torch.float32)
    program = torch.onnx.export(feature_map, (x,), dynamo=True, verbose=False)
    op_types = {node.op_type for node in program.model_proto.graph.node}
    assert op_types <= STANDARD_ONNX_OPS, op_types - STANDARD_ONNX_OPS
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(got, feature_map(x).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_hedgehog_magnitude_is_a_per_token_weight_on_both_halves():
    """phi(x) = [softmax(xW), softmax(-xW)] * exp(x . u), against a direct float64 formula; with u = 0 the kernel
    is bounded by 2, with u it can give one key (an attention sink) far more weight than that."""
    torch.manual_seed(0)
    fmap = HedgehogFeatureMap(2, 8).double()
    with torch.no_grad():
        fmap.weight.normal_()
        fmap.magnitude.normal_()
    x = torch.randn(1, 2, 5, 8, dtype=torch.float64)
    proj = torch.einsum("bhtd,hdf->bhtf", x, fmap.weight)
    want = torch.cat([proj.softmax(-1), (-proj).softmax(-1)], -1) * torch.exp(
        torch.einsum("bhtd,hd->bht", x, fmap.magnitude))[..., None]
    torch.testing.assert_close(fmap(x), want)
    with torch.no_grad():
        fmap.magnitude.zero_()
    bounded = fmap(x) @ fmap(x).mT
    assert float(bounded.max()) <= 2 + 1e-12
    with torch.no_grad():
        fmap.magnitude.fill_(1.0)
    assert float((fmap(x) @ fmap(x).mT).max()) > 2
