"""`low_rank`: a dense layer -> two thin matrices by truncated SVD (`relinear.approx.low_rank`)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from relinear.approx import low_rank as math
from relinear.families import DenseForm, dense_family, register
from relinear.recipe import RecipeError, RuleConfig, positive_int


@dataclasses.dataclass(frozen=True)
class LowRank(RuleConfig):
    """Dense -> two thin matrices by truncated SVD. Give exactly one of rank, ratio, energy."""

    name: ClassVar[str] = "low_rank"
    rank: int | str | None = None
    ratio: float | None = None
    energy: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        given = [f for f in ("rank", "ratio", "energy") if getattr(self, f) is not None]
        if len(given) != 1:
            raise RecipeError(f"low_rank: give exactly one of rank, ratio, energy (got {given or 'none'})")
        if self.rank is not None:
            positive_int(self, "rank", self.rank, allow_auto=True)
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise RecipeError(f"low_rank: ratio must be in (0, 1], got {self.ratio!r}")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise RecipeError(f"low_rank: energy must be in (0, 1], got {self.energy!r}")
        if self.rank == "auto" and self.max_error is None:
            raise RecipeError('low_rank: rank="auto" needs max_error (the budget it picks the rank for)')


def _settings(cfg: LowRank, w: torch.Tensor) -> list[int]:
    if cfg.rank == "auto":
        return sorted({r for r in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048) if r < min(w.shape)}
                      | {min(w.shape)})
    if cfg.energy is not None:
        return [math.rank_for_energy(w, cfg.energy)]
    if cfg.ratio is not None:
        return [math.rank_for_ratio(w, cfg.ratio)]
    return [cfg.rank]


def _lower(op, x, stored, factors, in_features: int, out_features: int):
    from relinear.export import lowering

    return lowering.low_rank_matmul(op, x, *stored)


def translate(x, down, up, bias=None):
    """`to_onnx`: two MatMuls (+ Add)."""
    from onnxscript import opset18 as op

    from relinear.export import lowering

    return lowering.low_rank_matmul(op, x, op.Transpose(down), op.Transpose(up), bias)


FORM = DenseForm(
    knob="rank",
    settings=_settings,
    sizes=lambda out_features, in_features: range(1, min(out_features, in_features) + 1),
    fit=lambda w, rank: tuple(reversed(math.svd_factors(w, rank))),  # the op takes (down, up)
    dense=lambda factors, in_features, out_features: factors[1] @ factors[0],
    cost=math.low_rank_cost,
    op="low_rank_linear",
    takes_out_features=False,
    lowering=_lower,
)

FAMILY = register(dense_family(LowRank, LowRank(rank=3), FORM, kernels=("relinear.kernels.low_rank",),
                               translation=translate))
