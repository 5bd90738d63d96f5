"""`block_sparse`: a dense layer -> block-sparse (the `density` fraction of `block` x `block` blocks of largest
score kept unchanged; `relinear.approx.sparse`), stored as BSR and run by `relinear.kernels.block_sparse`
(Triton on GPU, a gather-einsum on CPU)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from relinear.approx import sparse as math
from relinear.families import DenseForm, dense_family, register
from relinear.families.sparse import check_density, check_score, random_kept, score_inputs
from relinear.kernels.block_sparse.reference import block_sparse_to_dense
from relinear.recipe import RuleConfig, positive_int


@dataclasses.dataclass(frozen=True)
class BlockSparse(RuleConfig):
    """Dense -> block-sparse (BSR): the `density` fraction of `block` x `block` blocks of largest `score`
    ("magnitude": a block's Frobenius norm; "wanda": the norm of its |W| * ||x|| scores). `block` must divide
    both dims of a layer (a layer it does not divide is left alone); on GPU a power of two >= 16."""

    name: ClassVar[str] = "block_sparse"
    block: int = 32
    density: float = 0.25
    score: str = "magnitude"

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int(self, "block", self.block)
        check_density(self)
        check_score(self)


@dataclasses.dataclass(frozen=True)
class BlockPruning:
    block: int
    density: float
    score: str = "magnitude"

    def __str__(self) -> str:
        return f"{self.density:g}, block={self.block}" + ("" if self.score == "magnitude" else f", score={self.score}")


def _fit(weight: torch.Tensor, setting: BlockPruning, inputs=None):
    block = setting.block
    if weight.is_cuda and (block < 16 or block & (block - 1)):
        raise ValueError(f"the GPU kernel takes blocks of a power of two >= 16, not {block}")
    return math.fit_blocks(weight, block, setting.density, setting.score, None if inputs is None else inputs.norms)


def _sizes(out_features: int, in_features: int) -> list[BlockPruning]:
    blocks = [b for b in (1, 2, 4, 8, 16) if out_features % b == 0 and in_features % b == 0]
    return [BlockPruning(b, d) for b in blocks for d in (0.5, 1.0)]


def _structured(out_features: int, in_features: int, setting: BlockPruning, seed: int) -> torch.Tensor:
    """Exactly `kept_blocks` nonzero blocks."""
    gen = torch.Generator().manual_seed(seed)
    block = setting.block
    rows, cols = out_features // block, in_features // block
    kept = math.kept_blocks(rows * cols, setting.density)
    blocks = (torch.rand(rows * cols, generator=gen).argsort() < kept).reshape(rows, cols)
    return random_kept(blocks.repeat_interleave(block, 0).repeat_interleave(block, 1), gen)


def _cost(in_features: int, out_features: int, setting: BlockPruning) -> tuple[int, int]:
    num_blocks = (in_features // setting.block) * (out_features // setting.block)
    return math.sparse_cost(math.kept_blocks(num_blocks, setting.density) * setting.block ** 2)


def _block_index(factors) -> torch.Tensor:
    """(block-row, block-column) of each stored block: what an ONNX file stores instead of the row pointers."""
    values, crow, col = factors
    return torch.stack([math.csr_rows(crow, values.shape[0]), col], dim=1)


def _lower(op, x, stored, factors, in_features: int, out_features: int):
    from relinear.export import sparse_lowering

    return sparse_lowering.block_sparse_matmul(op, x, *stored, out_features, in_features, factors[0].shape[-1])


FORM = DenseForm(
    knob="density",
    settings=lambda cfg, w: [BlockPruning(cfg.block, cfg.density, cfg.score)],
    sizes=_sizes,
    fit=_fit,
    dense=lambda factors, in_features, out_features: block_sparse_to_dense(*factors, out_features, in_features),
    cost=_cost,
    op="block_sparse_linear",
    trains=("values",),
    scalars=lambda factors, out_features: (out_features, factors[0].shape[-1]),
    lowering=_lower,
    inputs=score_inputs,
    store=lambda factors, in_features, out_features: (factors[0], _block_index(factors)),
    structured=_structured,
)

FAMILY = register(dense_family(BlockSparse, BlockSparse(block=1, density=0.5), FORM,  # block 1: any shape
                               kernels=("relinear.kernels.block_sparse",),
                               translation="relinear.export.sparse_translation:block_sparse_linear"))
