"""The Triton backward of `relinear.block_sparse_linear`: on the forced kernel path (CPU tensors under
TRITON_INTERPRET=1) its gradients equal those of differentiating the torch form, and it is the backward that ran;
the op's registration contracts (opcheck)."""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from kernel_path import assert_kernel_gradients_match  # noqa: E402
from op_graph_checks import opcheck_with_backward  # noqa: E402

from relinear.kernels.block_sparse import block_sparse_from_dense, block_sparse_to_dense  # noqa: E402
from relinear.kernels.block_sparse.triton import transposed_layout  # noqa: E402

BLOCK = 16


def _layout(out_features, in_features, sparsity, empty_row, empty_col, seed):
    """A BSR triple whose block-row `empty_row` and block-column `empty_col` hold no stored block."""
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) + 0.1
    weight[empty_row * BLOCK:(empty_row + 1) * BLOCK] = 0.0
    weight[:, empty_col * BLOCK:(empty_col + 1) * BLOCK] = 0.0
    values, crow, col = block_sparse_from_dense(weight, BLOCK, sparsity)
    assert crow[empty_row + 1] == crow[empty_row], "the layout should have an empty block-row"
    assert not (col == empty_col).any(), "the layout should have an empty block-column"
    return values, crow, col


@pytest.mark.parametrize(
    ("out_features", "in_features", "sparsity", "with_bias"),
    [(48, 64, 0.5, True), (64, 32, 0.6, False)],
)
def test_block_sparse_backward_kernel_matches_torch_form(out_features, in_features, sparsity, with_bias,
                                                         monkeypatch):
    gen = torch.Generator().manual_seed(out_features)
    values, crow, col = _layout(out_features, in_features, sparsity, empty_row=1, empty_col=0, seed=in_features)
    x = torch.randn(2, 5, in_features, generator=gen).requires_grad_()
    values = values.requires_grad_()
    bias = torch.randn(out_features, generator=gen).requires_grad_() if with_bias else None
    inputs, args = (x, values, crow, col, bias), (out_features, BLOCK)
    assert_kernel_gradients_match(torch.ops.relinear.block_sparse_linear, inputs, args,
                                  "block_sparse_linear_backward_cuda", monkeypatch)


def test_transposed_layout_stores_the_transpose():
    values, crow, col = _layout(48, 64, 0.5, empty_row=2, empty_col=3, seed=3)
    dense = block_sparse_to_dense(values, crow, col, 48, 64)
    values_t, crow_t, col_t = transposed_layout(values, crow, col, 64)
    assert crow_t.dtype == crow.dtype and col_t.dtype == col.dtype
    torch.testing.assert_close(block_sparse_to_dense(values_t, crow_t, col_t, 64, 48), dense.T, rtol=0, atol=0)


def test_opcheck():
    values, crow, col = _layout(48, 64, 0.5, empty_row=1, empty_col=0, seed=0)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    bias = torch.randn(48, generator=torch.Generator().manual_seed(2), requires_grad=True)
    opcheck_with_backward(torch.ops.relinear.block_sparse_linear.default,
                          (x, values.requires_grad_(), crow, col, bias, 48, BLOCK))
