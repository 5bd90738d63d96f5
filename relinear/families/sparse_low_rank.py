"""`sparse_low_rank`: a dense layer -> a sparse matrix plus a low-rank one, W ~ S + up @ down, fitted by
alternating projection (`relinear.approx.sparse.sparse_plus_low_rank`): the low-rank part carries the
spread-out energy that pruning loses, the sparse part the large entries a low rank misses."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from relinear.approx import sparse as math
from relinear.families import DenseForm, dense_family, register
from relinear.families.sparse import check_density, exactly_sparse, flat_index
from relinear.recipe import RecipeError, RuleConfig, is_int_at_least


@dataclasses.dataclass(frozen=True)
class SparseLowRank(RuleConfig):
    """Dense -> S + U V: S keeps `density` of each row (CSR), U V has rank `rank` (0: S alone)."""

    name: ClassVar[str] = "sparse_low_rank"
    density: float = 0.1
    rank: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        check_density(self)
        if not is_int_at_least(self.rank, 0):
            raise RecipeError(f"sparse_low_rank: rank must be an integer >= 0, got {self.rank!r}")


@dataclasses.dataclass(frozen=True)
class SparsePlusRank:
    density: float
    rank: int

    def __str__(self) -> str:
        return f"{self.rank}, density={self.density:g}"


def _sizes(out_features: int, in_features: int) -> list[SparsePlusRank]:
    """The settings whose fit is exact on a weight of that form: rank 0 (S alone) and density 1 (S = W, U V = 0);
    alternating projection does not in general recover a sparse plus low-rank sum exactly."""
    return ([SparsePlusRank(d, 0) for d in (0.25, 0.5)]
            + [SparsePlusRank(1.0, r) for r in range(min(out_features, in_features) + 1)])


def _cost(in_features: int, out_features: int, setting: SparsePlusRank) -> tuple[int, int]:
    kept = out_features * math.kept_per_row(in_features, setting.density)
    return math.sparse_cost(kept + setting.rank * (in_features + out_features))


def _dense(factors, in_features: int, out_features: int) -> torch.Tensor:
    values, crow, col, down, up = factors
    return math.csr_to_dense(values, crow, col, in_features) + up @ down


def _lower(op, x, stored, factors, in_features: int, out_features: int):
    from relinear.export import sparse_lowering

    return sparse_lowering.sparse_low_rank_matmul(op, x, *stored, out_features, in_features)


FORM = DenseForm(
    knob="rank",
    settings=lambda cfg, w: [SparsePlusRank(cfg.density, cfg.rank)],
    sizes=_sizes,
    fit=lambda weight, setting: math.fit_sparse_low_rank(weight, setting.density, setting.rank),
    dense=_dense,
    cost=_cost,
    op="sparse_low_rank_linear",
    trains=("values", "down", "up"),
    takes_out_features=False,
    lowering=_lower,
    store=lambda factors, in_features, out_features: (factors[0], flat_index(factors, in_features),
                                                      factors[3].T, factors[4].T),
    structured=exactly_sparse,
)

FAMILY = register(dense_family(SparseLowRank, SparseLowRank(density=0.5, rank=2), FORM,
                               kernels=("relinear.kernels.sparse_low_rank",),
                               translation="relinear.export.sparse_translation:sparse_low_rank_linear"))
