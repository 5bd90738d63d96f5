"""`low_rank`: a dense layer -> two thin matrices by truncated SVD (`relinear.approx.low_rank`), or with
`whiten=True` by the SVD that minimizes the output error on the layer's inputs (`relinear.approx.whiten`)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from relinear.approx import low_rank as math
from relinear.approx.whiten import whitened_svd_factors
from relinear.families import DenseForm, dense_family, register
from relinear.recipe import RecipeError, RuleConfig, positive_int


@dataclasses.dataclass(frozen=True)
class LowRank(RuleConfig):
    """Dense -> two thin matrices by truncated SVD. Give exactly one of rank, ratio, energy. `whiten=True`:
    activation-aware (SVD-LLM), the rank-r factors of least output error on the example inputs and any
    calibration batches rather than of least weight error (rank, ratio and energy still read the weight)."""

    name: ClassVar[str] = "low_rank"
    rank: int | str | None = None
    ratio: float | None = None
    energy: float | None = None
    whiten: bool = False

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
        if not isinstance(self.whiten, bool):
            raise RecipeError(f"low_rank: whiten must be True or False, got {self.whiten!r}")


def _settings(cfg: LowRank, w: torch.Tensor) -> list[int]:
    if cfg.rank == "auto":
        return sorted({r for r in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048) if r < min(w.shape)}
                      | {min(w.shape)})
    if cfg.energy is not None:
        return [math.rank_for_energy(w, cfg.energy)]
    if cfg.ratio is not None:
        return [math.rank_for_ratio(w, cfg.ratio)]
    return [cfg.rank]


def _fit(weight: torch.Tensor, rank: int, inputs=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up), as the op takes them: plain SVD, or whitened by the inputs' Gram matrix when given."""
    up, down = math.svd_factors(weight, rank) if inputs is None else whitened_svd_factors(weight, inputs.gram, rank)
    return down, up


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
    fit=_fit,
    dense=lambda factors, in_features, out_features: factors[1] @ factors[0],
    cost=math.low_rank_cost,
    op="low_rank_linear",
    trains=("down", "up"),
    takes_out_features=False,
    lowering=_lower,
    inputs=lambda cfg: "gram" if cfg.whiten else "",
)

FAMILY = register(dense_family(LowRank, LowRank(rank=3), FORM, kernels=("relinear.kernels.low_rank",),
                               translation=translate))
