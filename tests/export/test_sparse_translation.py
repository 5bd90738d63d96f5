"""The sparse ops exported through `custom_translation_table` and run in ONNX Runtime match the ops' torch
output (which tests/kernels/test_sparse_ops.py pins to the dense masked product), at other token counts too."""

from __future__ import annotations

import onnxruntime
import pytest
import torch

import relinear.kernels.block_sparse
import relinear.kernels.sparse
import relinear.kernels.sparse24
import relinear.kernels.sparse_low_rank  # noqa: F401  (registers the ops)
from relinear.approx import sparse as S
from relinear.export.translation import custom_translation_table
from tests.export.onnx_helpers import run_session


class SparseLayer(torch.nn.Module):
    """One relinear sparse op with its weights as buffers (initializers in the file)."""

    def __init__(self, kind, out_features=12, in_features=16, seed=0, empty_rows=False):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        weight = torch.randn(out_features, in_features, generator=gen)
        if empty_rows:
            weight[::3] = 0.0  # the first row and others empty: CSR row pointers repeat
        self.kind, self.out_features = kind, out_features
        if kind == "sparse24":
            tensors = S.compress_24_kept(weight, S.mask_24(weight.abs()))
        elif kind == "block_sparse":
            tensors = S.to_bsr(weight, S.block_mask(weight.abs(), 2, 0.4), 2)
        else:
            sparse, up, down = S.sparse_plus_low_rank(weight, 0.3, 2)
            values, crow, col = S.to_csr(sparse)
            tensors = (values, crow, col) + ((down, up) if kind == "sparse_low_rank" else ())
        self.names = [f"w{i}" for i in range(len(tensors))]
        for name, t in zip(self.names, tensors, strict=True):
            self.register_buffer(name, t)
        self.register_buffer("bias", torch.randn(out_features, generator=gen))

    def forward(self, x):
        tensors = [getattr(self, n) for n in self.names]
        op = getattr(torch.ops.relinear, f"{self.kind}_linear")
        if self.kind == "block_sparse":
            return op(x, *tensors, self.bias, self.out_features, 2)
        return op(x, *tensors, self.bias)


@pytest.mark.parametrize(("empty_rows", "in_features"), [(False, 16), (True, 14)])  # 14: 2:4 has a partial group
@pytest.mark.parametrize("kind", ["sparse24", "sparse", "sparse_low_rank", "block_sparse"])
def test_sparse_ops_in_onnx_runtime(kind, empty_rows, in_features):
    layer = SparseLayer(kind, in_features=in_features, empty_rows=empty_rows).eval()
    tokens = torch.export.Dim("tokens", min=1, max=1024)
    program = torch.onnx.export(layer, (torch.randn(2, 5, in_features),), dynamo=True, verbose=False, optimize=True,
                                dynamic_shapes=({1: tokens},), custom_translation_table=custom_translation_table())
    model = program.model_proto
    assert {n.domain for n in model.graph.node} <= {""}  # standard ops only
    stored = {tuple(t.dims) for t in model.graph.initializer}
    assert (12, in_features) not in stored  # the dense weight is built in the graph, not stored
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for length in (5, 9):
        x = torch.randn(2, length, in_features)
        torch.testing.assert_close(run_session(session, (x,)), layer(x), atol=1e-5, rtol=1e-5)
