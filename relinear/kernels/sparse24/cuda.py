"""2:4 on CUDA: torch's semi-structured sparse tensors (CUTLASS / cuSPARSELt sparse tensor cores, sm80+).

The compact weight is rebuilt densely and converted each call (`to_sparse_semi_structured` compresses it
again into the hardware's metadata format); where the device, dtype or shape does not fit the sparse tensor
cores, the dense masked product runs instead, which gives the same result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

from relinear.approx.sparse import dense_24
from relinear.kernels.sparse24.reference import check_layout, sparse24_linear_reference

MIN_CAPABILITY = (8, 0)


def semi_structured_fits(weight: torch.Tensor) -> bool:
    """Whether `weight` [out, in] can become a semi-structured sparse tensor on its device."""
    if not weight.is_cuda or torch.cuda.get_device_capability(weight.device) < MIN_CAPABILITY:
        return False
    limits = SparseSemiStructuredTensor._DTYPE_SHAPE_CONSTRAINTS.get(weight.dtype)
    if limits is None:
        return False
    return weight.shape[0] % limits.sparse_min_rows == 0 and weight.shape[1] % limits.sparse_min_cols == 0


def sparse24_linear_cuda(x: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                         bias: torch.Tensor | None) -> torch.Tensor:
    check_layout(x, values, positions)
    weight = dense_24(values, positions, x.shape[-1]).to(x.dtype)
    if not semi_structured_fits(weight):
        return sparse24_linear_reference(x, values, positions, bias)
    rows = x.reshape(-1, x.shape[-1])
    y = F.linear(rows, to_sparse_semi_structured(weight), None if bias is None else bias.to(x.dtype))
    return y.reshape(*x.shape[:-1], values.shape[0])
