"""`btt`: a dense layer -> a two-core Block Tensor-Train, fitted in closed form by `relinear.approx.btt`."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from relinear.approx import btt as math
from relinear.families import DenseForm, dense_family, register
from relinear.recipe import RecipeError, RuleConfig, positive_int


@dataclasses.dataclass(frozen=True)
class BTT(RuleConfig):
    """Dense -> Block Tensor-Train with `cores` cores and TT-rank `rank` (rank 1, 2 cores ~ Monarch)."""

    name: ClassVar[str] = "btt"
    cores: int = 2
    rank: int | str = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int(self, "cores", self.cores)
        if self.cores != 2:
            raise RecipeError(f"btt: only cores=2 is implemented, got {self.cores!r}")
        positive_int(self, "rank", self.rank, allow_auto=True)
        if self.rank == "auto" and self.max_error is None:
            raise RecipeError('btt: rank="auto" needs max_error (the budget it picks the rank for)')


def lower_block_tensor_train(op, x, stored, factors, in_features: int, out_features: int):
    """`rewrite_onnx`: one batched MatMul per core, a Reshape/Transpose between them (Monarch's too)."""
    from relinear.export import lowering

    grid = lowering.btt_grid(factors[0].shape, factors[1].shape)
    return lowering.block_tensor_train_matmul(op, x, *stored, grid, in_features, out_features)


def translate(x, core1, core2, bias=None, out_features: int = 0):
    """`to_onnx` of btt_linear and monarch_linear (blocks1 / blocks2 are core1 / core2 of the same layout)."""
    from onnxscript import opset18 as op

    from relinear.export import lowering

    in_features = x.shape[-1]
    if not isinstance(in_features, int):
        raise ValueError(f"btt_linear/monarch_linear: the input's feature dim must be static, got {in_features}")
    grid = lowering.btt_grid(core1.shape, core2.shape)
    core1_t, core2_t = (op.Transpose(c, perm=[0, 2, 1]) for c in (core1, core2))
    y = lowering.block_tensor_train_matmul(op, x, core1_t, core2_t, grid, in_features, out_features)
    return y if bias is None else op.Add(y, bias)


def _ranks(out_features: int, in_features: int) -> range:
    grid = math.btt_grid(in_features, out_features, 1)
    return range(1, min(grid.m2, grid.n2) + 1)


FORM = DenseForm(
    knob="rank",
    settings=lambda cfg, w: ([r for r in (1, 2, 4, 8, 16, 32) if r in _ranks(*w.shape)] if cfg.rank == "auto"
                             else [cfg.rank]),
    sizes=_ranks,
    fit=math.btt_fit,
    dense=lambda factors, in_features, out_features: math.btt_to_dense(*factors, in_features, out_features),
    cost=math.btt_cost,
    op="btt_linear",
    trains=("core1", "core2"),
    lowering=lower_block_tensor_train,
)

FAMILY = register(dense_family(BTT, BTT(rank=2), FORM, kernels=("relinear.kernels.btt",), translation=translate))
