"""The sparse ops against x @ W.T + b with W the dense masked weight (float64), both CSR paths, their
autograd, opcheck, torch.compile and torch.export; the CUDA 2:4 path is import-checked and falls back on CPU."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from op_graph_checks import check_export_keeps_one_node_per_op, check_torch_compile, opcheck_with_backward

import relinear.kernels.sparse
import relinear.kernels.sparse24
import relinear.kernels.sparse_low_rank  # noqa: F401  (registers the ops)
from relinear.approx import sparse as S
from relinear.kernels.sparse import reference as sparse_reference

OPS = ("sparse24", "sparse", "sparse_low_rank")


def _weights(kind, in_features, out_features, seed, density=0.3, dtype=torch.float64):
    """The op's weight tensors and the dense W they stand for, built without the op's code path."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen, dtype=torch.float64)
    if kind == "sparse24":
        keep = S.mask_24(weight.abs())
        values, positions = S.compress_24_kept(weight, keep)
        return (values.to(dtype), positions), (weight * keep).to(dtype)
    masked = weight * (torch.rand(out_features, in_features, generator=gen) < density)
    csr = masked.to_sparse_csr()
    tensors = (csr.values().to(dtype), csr.crow_indices(), csr.col_indices())
    if kind == "sparse":
        return tensors, masked.to(dtype)
    rank = max(1, min(in_features, out_features) // 3)
    down = torch.randn(rank, in_features, generator=gen, dtype=torch.float64)
    up = torch.randn(out_features, rank, generator=gen, dtype=torch.float64)
    return (*tensors, down.to(dtype), up.to(dtype)), (masked + up @ down).to(dtype)


def _call(kind, x, weights, bias):
    return getattr(torch.ops.relinear, f"{kind}_linear")(x, *weights, bias)


def _expected(x, dense, bias):
    y = x.double() @ dense.double().T
    return y if bias is None else y + bias.double()


@pytest.fixture(params=["csr_matmul", "dense_form"])
def csr_path(request, monkeypatch):
    """Run each CSR test on both forms: torch's CSR matmul (every density) and the dense rebuild (none)."""
    monkeypatch.setattr(sparse_reference, "SPARSE_MATMUL_MAX_DENSITY", 1.0 if request.param == "csr_matmul" else -1)
    return request.param


@pytest.mark.property
@settings(max_examples=20, suppress_health_check=[HealthCheck.function_scoped_fixture])  # the path is constant
@given(kind=st.sampled_from(OPS), in_features=st.integers(1, 30), out_features=st.integers(1, 20),
       lead=st.lists(st.integers(0, 3), max_size=3), with_bias=st.booleans(), density=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**16))
def test_ops_match_the_dense_masked_layer(csr_path, kind, in_features, out_features, lead, with_bias, density, seed):
    weights, dense = _weights(kind, in_features, out_features, seed, density)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*lead, in_features, generator=gen, dtype=torch.float64)
    bias = torch.randn(out_features, generator=gen, dtype=torch.float64) if with_bias else None
    y = _call(kind, x, weights, bias)
    assert y.shape == (*lead, out_features) and y.is_contiguous()
    torch.testing.assert_close(y, _expected(x, dense, bias), rtol=1e-10, atol=1e-10)


def test_the_csr_matmul_runs_only_at_low_density():
    x = torch.randn(3, 10)
    for density, expected in ((0.1, True), (0.2, True), (0.5, False)):
        values = torch.ones(round(density * 40))
        assert sparse_reference.uses_sparse_matmul(x, values, torch.zeros(5, dtype=torch.int64)) is expected
    assert not sparse_reference.uses_sparse_matmul(x.bfloat16(), torch.ones(1), torch.zeros(5, dtype=torch.int64))


@pytest.mark.parametrize("kind", OPS)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_low_precision_inputs(kind, dtype, tol):
    weights, dense = _weights(kind, 48, 30, 0, dtype=dtype)
    x = torch.randn(2, 5, 48, dtype=dtype)
    bias = torch.randn(30, dtype=dtype)
    y = _call(kind, x, weights, bias)
    assert y.dtype == dtype
    expected = _expected(x, dense, bias)
    scale = expected.abs().max()
    torch.testing.assert_close(y.double() / scale, expected / scale, rtol=0, atol=tol)


@pytest.mark.parametrize("kind", OPS)
def test_gradients_match_the_dense_masked_layer(csr_path, kind):
    weights, _ = _weights(kind, 22, 14, 1)  # 22 inputs: 2:4's last group is partial
    float_slots = [i for i, w in enumerate(weights) if w.is_floating_point()]
    x, bias = torch.randn(2, 3, 22, dtype=torch.float64), torch.randn(14, dtype=torch.float64)
    grad_out = torch.randn(2, 3, 14, dtype=torch.float64)

    def leaves():
        ws = [w.clone().requires_grad_(i in float_slots) for i, w in enumerate(weights)]
        return x.clone().requires_grad_(), ws, bias.clone().requires_grad_()

    x1, w1, b1 = leaves()
    _call(kind, x1, w1, b1).backward(grad_out)
    x2, w2, b2 = leaves()
    if kind == "sparse24":
        dense = S.dense_24(*w2, 22)
    else:
        dense = S.csr_to_dense(w2[0], w2[1], w2[2], 22)
        if kind == "sparse_low_rank":
            dense = dense + w2[4] @ w2[3]
    _expected(x2, dense, b2).backward(grad_out)
    for got, want in zip([x1, b1, *(w1[i] for i in float_slots)], [x2, b2, *(w2[i] for i in float_slots)],
                         strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", OPS)
def test_opcheck(kind):
    op = getattr(torch.ops.relinear, f"{kind}_linear").default
    for in_features, out_features, lead, with_bias, grad in [(12, 9, (4,), True, False),
                                                             (16, 16, (2, 3), False, True)]:
        weights, _ = _weights(kind, in_features, out_features, 0, dtype=torch.float32)
        weights = tuple(w.requires_grad_(grad) if w.is_floating_point() else w for w in weights)
        x = torch.randn(*lead, in_features, requires_grad=grad)
        bias = torch.randn(out_features, requires_grad=grad) if with_bias else None
        opcheck_with_backward(op, (x, *weights, bias))


class _Layers(torch.nn.Module):
    """One layer of each op in a row: 24 -> 20 -> 16 -> 12 features."""

    def __init__(self):
        super().__init__()
        self.shapes = {"sparse24": (24, 20), "sparse": (20, 16), "sparse_low_rank": (16, 12)}
        self.slots = {}
        for seed, (kind, (in_features, out_features)) in enumerate(self.shapes.items()):
            weights, _ = _weights(kind, in_features, out_features, seed, dtype=torch.float32)
            self.slots[kind] = len(weights)
            for slot, w in enumerate(weights):
                self.register_buffer(f"{kind}{slot}", w)
            self.register_parameter(f"{kind}_bias", torch.nn.Parameter(torch.randn(out_features)))

    def forward(self, x):
        for kind in self.shapes:
            weights = [getattr(self, f"{kind}{slot}") for slot in range(self.slots[kind])]
            x = _call(kind, x, weights, getattr(self, f"{kind}_bias"))
        return x


def test_torch_compile_runs_the_ops():
    check_torch_compile(_Layers().eval(), 24)


def test_torch_export_keeps_one_node_per_op():
    ops = [getattr(torch.ops.relinear, f"{kind}_linear").default for kind in OPS]
    check_export_keeps_one_node_per_op(_Layers().eval(), 24, ops)


@pytest.mark.parametrize(("kind", "args", "match"), [
    ("sparse24", lambda: (torch.randn(2, 8), torch.randn(3, 4), torch.zeros(3, 3, dtype=torch.int8), None),
     "values and positions must both be"),
    ("sparse24", lambda: (torch.randn(2, 4), torch.randn(3, 4), torch.zeros(3, 4, dtype=torch.int8), None),
     "x has 4 features but the 2:4 weight stores 2 groups of 4 inputs"),
    ("sparse", lambda: (torch.randn(2, 6), torch.randn(3), torch.tensor([0, 3]), torch.tensor([0, 1]), None),
     "values and col_indices"),
    ("sparse_low_rank", lambda: (torch.randn(2, 6), torch.randn(1), torch.tensor([0, 1]), torch.tensor([0]),
                                 torch.randn(2, 6), torch.randn(1, 3), None), "must share the rank"),
])
def test_bad_layouts_are_named(kind, args, match):
    with pytest.raises(ValueError, match=match):
        getattr(relinear.kernels, kind).op.__dict__[f"{kind}_linear"](*args())


def test_cuda_24_path_imports_and_falls_back_without_sparse_tensor_cores():
    from relinear.kernels.sparse24.cuda import semi_structured_fits, sparse24_linear_cuda

    weights, dense = _weights("sparse24", 64, 32, 2, dtype=torch.float32)
    assert not semi_structured_fits(dense)  # a CPU tensor: no semi-structured sparse tensor
    x = torch.randn(3, 64)
    torch.testing.assert_close(sparse24_linear_cuda(x, *weights, None), x @ dense.T)
