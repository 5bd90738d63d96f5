"""`monarch`: a dense layer -> two block-diagonal factors and a fixed permutation, the closed-form projection of
`relinear.approx.monarch`. Stored and lowered to ONNX as the two-core BTT it is."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from relinear.approx import monarch as math
from relinear.families import DenseForm, dense_family, register
from relinear.families.btt import lower_block_tensor_train, translate
from relinear.recipe import RecipeError, RuleConfig, positive_int


@dataclasses.dataclass(frozen=True)
class Monarch(RuleConfig):
    """Dense -> Monarch (two block-diagonal factors and a fixed permutation), closed-form projection."""

    name: ClassVar[str] = "monarch"
    nblocks: int | str = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int(self, "nblocks", self.nblocks, allow_auto=True)
        if self.nblocks == "auto" and self.max_error is None:
            raise RecipeError('monarch: nblocks="auto" needs max_error (the budget it picks nblocks for)')


def _settings(cfg: Monarch, w) -> list[int]:
    if cfg.nblocks != "auto":
        return [cfg.nblocks]
    # fewer blocks = more parameters, so the cheapest setting comes first
    return [b for b in (64, 32, 16, 8, 4, 2) if b <= min(w.shape)]


FORM = DenseForm(
    knob="nblocks",
    settings=_settings,
    sizes=lambda out_features, in_features: range(1, min(out_features, in_features) + 1),
    fit=math.monarch_project,
    dense=lambda factors, in_features, out_features: math.monarch_to_dense(*factors, in_features, out_features),
    cost=math.monarch_cost,
    op="monarch_linear",
    trains=("blocks1", "blocks2"),
    lowering=lower_block_tensor_train,
)

FAMILY = register(dense_family(Monarch, Monarch(nblocks=4), FORM, kernels=("relinear.kernels.monarch",),
                               translation=translate))
