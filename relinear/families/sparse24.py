"""`sparse24`: a dense layer -> 2:4 semi-structured sparsity (2 of every 4 consecutive inputs of each output row
kept unchanged, by magnitude or Wanda score; `relinear.approx.sparse`). Stored compact (values + int8 offsets);
torch's semi-structured sparse tensors run it on CUDA sm80+, the dense masked product elsewhere."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from relinear.approx import sparse as math
from relinear.families import DenseForm, dense_family, register
from relinear.families.sparse import check_score, random_kept, score_inputs
from relinear.recipe import RuleConfig


@dataclasses.dataclass(frozen=True)
class Sparse24(RuleConfig):
    """Dense -> 2:4 sparse: in every group of 4 consecutive inputs of a row, the 2 of largest `score`
    ("magnitude": |W|; "wanda": |W| * ||x||, input norms from the example or calibration batches)."""

    name: ClassVar[str] = "sparse24"
    score: str = "magnitude"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_score(self)


def _fit(weight: torch.Tensor, score: str, inputs=None) -> tuple[torch.Tensor, torch.Tensor]:
    return math.fit_24(weight, score, None if inputs is None else inputs.norms)


def _structured(out_features: int, in_features: int, score: str, seed: int) -> torch.Tensor:
    """At most 2 nonzeros in every group of 4 (exactly 2 in every full group)."""
    gen = torch.Generator().manual_seed(seed)
    groups = torch.rand(out_features, -(-in_features // 4), 4, generator=gen).argsort(-1) < 2
    return random_kept(groups.reshape(out_features, -1)[:, :in_features], gen)


def _lower(op, x, stored, factors, in_features: int, out_features: int):
    from relinear.export import sparse_lowering

    return sparse_lowering.sparse24_matmul(op, x, *stored, out_features, in_features)


FORM = DenseForm(
    knob="score",
    settings=lambda cfg, w: [cfg.score],
    sizes=lambda out_features, in_features: ["magnitude"],
    fit=_fit,
    dense=lambda factors, in_features, out_features: math.dense_24(*factors, in_features),
    cost=lambda in_features, out_features, score: math.sparse_cost(out_features * 2 * -(-in_features // 4)),
    op="sparse24_linear",
    trains=("values",),
    takes_out_features=False,
    lowering=_lower,
    inputs=score_inputs,
    store=lambda factors, in_features, out_features: factors,
    structured=_structured,
)

FAMILY = register(dense_family(Sparse24, Sparse24(), FORM, kernels=("relinear.kernels.sparse24",),
                               translation="relinear.export.sparse_translation:sparse24_linear"))
