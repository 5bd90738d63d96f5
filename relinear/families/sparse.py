"""`sparse`: a dense layer -> unstructured sparsity (per output row, the `density` fraction of weights of largest
magnitude or Wanda score kept unchanged; `relinear.approx.sparse`), stored as CSR. Also the pieces the other
pruning families share: the score check, the setting, and exactly-sparse test weights."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from relinear.approx import sparse as math
from relinear.families import DenseForm, dense_family, register
from relinear.recipe import RecipeError, RuleConfig


def check_score(cfg: RuleConfig) -> None:
    if cfg.score not in math.SCORES:
        raise RecipeError(f"{cfg.name}: score must be one of {', '.join(math.SCORES)}, got {cfg.score!r}")


def check_density(cfg: RuleConfig) -> None:
    if isinstance(cfg.density, bool) or not isinstance(cfg.density, (int, float)) or not 0 < cfg.density <= 1:
        raise RecipeError(f"{cfg.name}: density must be a number in (0, 1], got {cfg.density!r}")


def score_inputs(cfg: RuleConfig) -> str:
    """Wanda reads the input norms; magnitude reads nothing."""
    return "norms" if cfg.score == "wanda" else ""


@dataclasses.dataclass(frozen=True)
class Pruning:
    """A pruning setting: how much to keep, by which score."""

    density: float
    score: str = "magnitude"

    def __str__(self) -> str:
        return f"{self.density:g}" + ("" if self.score == "magnitude" else f", score={self.score}")


def random_kept(keep: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """float64 weights, nonzero (|w| in [0.5, 1.5]) exactly where `keep` is True: an exactly sparse weight."""
    magnitude = torch.rand(keep.shape, generator=gen, dtype=torch.float64) + 0.5
    sign = torch.where(torch.rand(keep.shape, generator=gen) < 0.5, -1.0, 1.0).to(torch.float64)
    return magnitude * sign * keep


def flat_index(factors, in_features: int) -> torch.Tensor:
    """row * in + col of each CSR entry: what an ONNX file stores instead of the row pointers (int32 if it fits)."""
    values, crow, col = factors[:3]
    flat = math.csr_rows(crow, values.shape[0]) * in_features + col
    return flat.to(torch.int32) if (crow.shape[0] - 1) * in_features < 2**31 else flat


@dataclasses.dataclass(frozen=True)
class Sparse(RuleConfig):
    """Dense -> unstructured sparse (CSR): per output row the `density` fraction of weights of largest `score`
    ("magnitude" or "wanda"). torch's CSR matmul runs it on CPU up to 20% density, the dense form above."""

    name: ClassVar[str] = "sparse"
    density: float = 0.1
    score: str = "magnitude"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_density(self)
        check_score(self)


def _fit(weight: torch.Tensor, setting: Pruning, inputs=None):
    return math.fit_unstructured(weight, setting.density, setting.score, None if inputs is None else inputs.norms)


def exactly_sparse(out_features: int, in_features: int, setting, seed: int) -> torch.Tensor:
    """Exactly `kept_per_row(in, setting.density)` nonzeros in every row."""
    gen = torch.Generator().manual_seed(seed)
    kept = math.kept_per_row(in_features, setting.density)
    return random_kept(torch.rand(out_features, in_features, generator=gen).argsort(-1) < kept, gen)


def _lower(op, x, stored, factors, in_features: int, out_features: int):
    from relinear.export import sparse_lowering

    return sparse_lowering.flat_sparse_matmul(op, x, *stored, out_features, in_features)


FORM = DenseForm(
    knob="density",
    settings=lambda cfg, w: [Pruning(cfg.density, cfg.score)],
    sizes=lambda out_features, in_features: [Pruning(d) for d in (0.25, 0.5, 1.0)],
    fit=_fit,
    dense=lambda factors, in_features, out_features: math.csr_to_dense(*factors, in_features),
    cost=lambda in_features, out_features, setting: math.sparse_cost(
        out_features * math.kept_per_row(in_features, setting.density)),
    op="sparse_linear",
    trains=("values",),
    takes_out_features=False,
    lowering=_lower,
    inputs=score_inputs,
    store=lambda factors, in_features, out_features: (factors[0], flat_index(factors, in_features)),
    structured=exactly_sparse,
)

FAMILY = register(dense_family(Sparse, Sparse(density=0.5), FORM, kernels=("relinear.kernels.sparse",),
                               translation="relinear.export.sparse_translation:sparse_linear"))
