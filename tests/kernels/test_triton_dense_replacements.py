"""Triton kernels of the dense-layer replacements (Monarch, BTT, block-sparse) vs dense matmuls, on CPU
through Triton's interpreter."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels then run on CPU tensors

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not installed")

from relinear.approx.btt import btt_to_dense  # noqa: E402
from relinear.approx.monarch import monarch_project  # noqa: E402
from relinear.kernels.block_sparse import (  # noqa: E402
    block_sparse_from_dense,
    block_sparse_linear_reference,
    block_sparse_to_dense,
)
from relinear.kernels.block_sparse.triton import block_sparse_linear_cuda  # noqa: E402
from relinear.kernels.btt.triton import btt_linear_cuda  # noqa: E402
from relinear.kernels.monarch.triton import monarch_linear_cuda  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 5e-3}


def relative_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt()).item()


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def dense_expected(x, weight, bias):
    """The independent oracle: F.linear in float64 on exactly the values the kernel saw."""
    return F.linear(x.double(), weight.double(), None if bias is None else bias.double())


@pytest.mark.parametrize(("out_features", "in_features", "nblocks", "dtype", "with_bias"), [
    (64, 64, 8, torch.float32, True),       # classic Monarch: one channel per block pair
    (100, 70, 4, torch.float32, False),     # padded input and output
    (48, 96, 2, torch.float32, True),       # few large blocks: several channels per pair
    (256, 256, 16, torch.bfloat16, True),
])
def test_monarch_kernel_matches_dense(out_features, in_features, nblocks, dtype, with_bias):
    blocks1, blocks2 = (b.to(dtype) for b in monarch_project(randn(out_features, in_features), nblocks))
    x = randn(3, 37, in_features, seed=1).to(dtype)
    bias = randn(out_features, seed=2).to(dtype) if with_bias else None
    out = monarch_linear_cuda(x, blocks1, blocks2, bias, out_features)
    weight = btt_to_dense(blocks1.double(), blocks2.double(), in_features, out_features)
    assert out.shape == (3, 37, out_features) and out.dtype == dtype
    assert relative_rms(out, dense_expected(x, weight, bias)) <= TOLERANCE[dtype]


def test_btt_kernel_matches_dense_for_general_cores():
    m1, m2, n1, n2, rank = 4, 12, 5, 8, 3
    core1, core2 = randn(m1, n1 * rank, m2, seed=3), randn(n1, n2, rank * m1, seed=4)
    x = randn(50, 45, seed=5)
    out = btt_linear_cuda(x, core1, core2, None, 37)
    assert relative_rms(out, dense_expected(x, btt_to_dense(core1, core2, 45, 37), None)) <= 1e-5


def test_btt_kernel_rejects_mismatched_cores():
    with pytest.raises(ValueError, match="BTT pair"):
        btt_linear_cuda(randn(4, 16), randn(4, 6, 4), randn(3, 4, 12), None, 8)


@pytest.mark.filterwarnings("ignore:Sparse")  # torch's BSR tensor, used here only as the oracle, is beta
@pytest.mark.parametrize(("block_size", "out_features", "in_features", "sparsity", "dtype"), [
    (16, 64, 96, 0.5, torch.float32),
    (32, 128, 64, 0.9, torch.float32),
    (64, 128, 192, 0.75, torch.float32),
    (32, 96, 128, 0.6, torch.bfloat16),
])
def test_block_sparse_kernel_matches_dense(block_size, out_features, in_features, sparsity, dtype):
    values, crow, col = block_sparse_from_dense(randn(out_features, in_features), block_size, sparsity)
    values = values.to(dtype)
    x = randn(2, 33, in_features, seed=6).to(dtype)
    bias = randn(out_features, seed=7).to(dtype)
    weight = torch.sparse_bsr_tensor(crow, col, values.double(), (out_features, in_features)).to_dense()
    expected = dense_expected(x, weight, bias)
    out = block_sparse_linear_cuda(x, values, crow, col, bias, out_features, block_size)
    assert out.shape == (2, 33, out_features) and out.dtype == dtype
    assert relative_rms(out, expected) <= TOLERANCE[dtype]
    reference = block_sparse_linear_reference(x, values, crow, col, bias, out_features, block_size)
    assert relative_rms(reference, expected) <= TOLERANCE[dtype]


def test_block_sparse_op_runs_the_reference_on_cpu():
    values, crow, col = block_sparse_from_dense(randn(32, 32), 16, 0.5)
    x = randn(5, 32, seed=8)
    out = torch.ops.relinear.block_sparse_linear(x, values, crow, col, None, 32, 16)
    assert torch.equal(out, block_sparse_linear_reference(x, values, crow, col, None, 32, 16))


def test_layout_keeps_the_largest_blocks():
    weight = torch.zeros(64, 64)
    weight[16:32, 48:64] = 5.0  # the strongest block
    weight[0:16, 0:16] = 1.0
    weight[48:64, 16:32] = 0.5
    values, crow, col = block_sparse_from_dense(weight, 16, 14 / 16)  # keep 2 of 16 blocks
    assert crow.tolist() == [0, 1, 2, 2, 2] and col.tolist() == [0, 3]
    assert torch.equal(block_sparse_to_dense(values, crow, col, 64, 64),
                       torch.where(weight >= 1.0, weight, torch.zeros_like(weight)))


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(block_size=12, sparsity=0.5), "block_size"),
    (dict(block_size=16, sparsity=1.0), "sparsity"),
])
def test_layout_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        block_sparse_from_dense(randn(32, 32), **kwargs)
