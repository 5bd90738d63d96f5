"""The dense-layer ops against x @ W.T + b with W rebuilt densely by relinear.approx (an einsum, not the
ops' bmm path), their autograd, and their behaviour under opcheck, torch.compile and torch.export."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from op_graph_checks import check_export_keeps_one_node_per_op, check_torch_compile, opcheck_with_backward

import relinear.kernels.btt
import relinear.kernels.low_rank
import relinear.kernels.monarch  # noqa: F401  (registers the ops)
from relinear.approx.btt import btt_grid, btt_to_dense
from relinear.approx.monarch import monarch_grid, monarch_to_dense
from relinear.kernels.btt import reference as btt_reference

OPS = ("low_rank", "monarch", "btt")


def _weights(kind, in_features, out_features, seed, dtype=torch.float64):
    """Random weights of one op, and a function rebuilding the dense W from them (differentiably)."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
    if kind == "low_rank":
        rank = max(1, min(in_features, out_features) // 2)
        return (rand(rank, in_features), rand(out_features, rank)), lambda down, up: up @ down
    if kind == "monarch":
        grid = monarch_grid(in_features, out_features, max(1, min(in_features, out_features) // 3))
        dense = lambda b1, b2: monarch_to_dense(b1, b2, in_features, out_features)
    else:
        grid = btt_grid(in_features, out_features, 1)
        grid = btt_grid(in_features, out_features, min(2, grid.m2, grid.n2))
        dense = lambda c1, c2: btt_to_dense(c1, c2, in_features, out_features)
    return (rand(*grid.core1_shape), rand(*grid.core2_shape)), dense


def _call(kind, x, weights, bias, out_features):
    if kind == "low_rank":
        return torch.ops.relinear.low_rank_linear(x, *weights, bias)
    return getattr(torch.ops.relinear, f"{kind}_linear")(x, *weights, bias, out_features)


def _expected(x, dense, bias):
    y = x.double() @ dense.double().T
    return y if bias is None else y + bias.double()


@pytest.mark.property
@settings(max_examples=25)
@given(
    kind=st.sampled_from(OPS),
    in_features=st.integers(1, 40),
    out_features=st.integers(1, 40),
    lead=st.lists(st.integers(0, 3), max_size=3),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_ops_match_the_dense_layer(kind, in_features, out_features, lead, with_bias, seed):
    weights, dense = _weights(kind, in_features, out_features, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*lead, in_features, generator=gen, dtype=torch.float64)
    bias = torch.randn(out_features, generator=gen, dtype=torch.float64) if with_bias else None
    y = _call(kind, x, weights, bias, out_features)
    assert y.shape == (*lead, out_features) and y.is_contiguous()
    torch.testing.assert_close(y, _expected(x, dense(*weights), bias), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", OPS)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_low_precision_inputs(kind, dtype, tol):
    weights, dense = _weights(kind, 45, 30, 0, dtype)
    x = torch.randn(2, 5, 45, dtype=dtype)
    bias = torch.randn(30, dtype=dtype)
    y = _call(kind, x, weights, bias, 30)
    assert y.dtype == dtype
    expected = _expected(x, dense(*(w.double() for w in weights)), bias)
    scale = expected.abs().max()
    torch.testing.assert_close(y.double() / scale, expected / scale, rtol=0, atol=tol)


@pytest.mark.parametrize("kind", ["monarch", "btt"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("token_minor", [True, False])
def test_chunked_cpu_path_matches_the_reference(kind, with_bias, token_minor, monkeypatch):
    # Tiny chunks: many chunks and a ragged last one, padded input and output; float64 runs the token-minor
    # layout (fp32/fp64's) or, with no dtype allowed it, the token-major one (bfloat16's).
    monkeypatch.setattr(btt_reference, "_CHUNK_ELEMENTS", 100)
    monkeypatch.setattr(btt_reference, "_ANY_LAYOUT_DTYPES", (torch.float64,) if token_minor else ())
    weights, _ = _weights(kind, 29, 23, 3)
    x = torch.randn(3, 17, 29, dtype=torch.float64)
    bias = torch.randn(23, dtype=torch.float64) if with_bias else None
    fast = btt_reference.btt_linear_cpu(x, *weights, bias, 23)
    torch.testing.assert_close(fast, btt_reference.btt_linear_reference(x, *weights, bias, 23), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", OPS)
def test_gradients_match_the_dense_layer(kind):
    weights, dense = _weights(kind, 21, 14, 1)
    x = torch.randn(2, 3, 21, dtype=torch.float64)
    bias = torch.randn(14, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, *weights, bias)]
    naive = [t.clone().requires_grad_() for t in (x, *weights, bias)]
    grad_out = torch.randn(2, 3, 14, dtype=torch.float64)
    _call(kind, leaves[0], tuple(leaves[1:-1]), leaves[-1], 14).backward(grad_out)
    _expected(naive[0], dense(*naive[1:-1]), naive[-1]).backward(grad_out)
    for got, want in zip(leaves, naive, strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", OPS)
def test_opcheck(kind):
    op = getattr(torch.ops.relinear, f"{kind}_linear").default
    samples = []
    for in_features, out_features, lead, with_bias, grad in [
        (12, 9, (4,), True, False),
        (16, 16, (2, 3), False, True),
    ]:
        weights, _ = _weights(kind, in_features, out_features, 0, torch.float32)
        x = torch.randn(*lead, in_features, requires_grad=grad)
        weights = tuple(w.requires_grad_(grad) for w in weights)
        bias = torch.randn(out_features, requires_grad=grad) if with_bias else None
        tail = () if kind == "low_rank" else (out_features,)
        samples.append((x, *weights, bias, *tail))
    for args in samples:
        opcheck_with_backward(op, args)


class _Layers(torch.nn.Module):
    """One layer of each op in a row: 24 -> 20 -> 18 -> 16 features."""

    def __init__(self):
        super().__init__()
        self.shapes = {"low_rank": (24, 20), "monarch": (20, 18), "btt": (18, 16)}
        for seed, (kind, (in_features, out_features)) in enumerate(self.shapes.items()):
            weights, _ = _weights(kind, in_features, out_features, seed, torch.float32)
            for slot, w in enumerate(weights):
                self.register_parameter(f"{kind}{slot}", torch.nn.Parameter(w))
            self.register_parameter(f"{kind}_bias", torch.nn.Parameter(torch.randn(out_features)))

    def forward(self, x):
        for kind, (_, out_features) in self.shapes.items():
            weights = (getattr(self, f"{kind}0"), getattr(self, f"{kind}1"))
            x = _call(kind, x, weights, getattr(self, f"{kind}_bias"), out_features)
        return x


def test_torch_compile_runs_the_ops():
    check_torch_compile(_Layers().eval(), 24)


def test_torch_export_keeps_one_node_per_op():
    ops = [getattr(torch.ops.relinear, f"{kind}_linear").default for kind in OPS]
    check_export_keeps_one_node_per_op(_Layers().eval(), 24, ops)
