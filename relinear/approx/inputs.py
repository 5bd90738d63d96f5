"""What the data-aware fits need to know about a layer's inputs, accumulated over any number of batches:
per-feature sums of squares (Wanda's input norms) and, when asked for, the Gram matrix X^T X (whitened low
rank). Both in float64, summed over every token, so batches of any size and count add up exactly."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class InputStats:
    features: int
    with_gram: bool = False
    tokens: int = 0
    sum_squares: torch.Tensor | None = None  # [features] float64
    gram: torch.Tensor | None = None  # [features, features] float64, when with_gram

    def __post_init__(self) -> None:
        self.sum_squares = torch.zeros(self.features, dtype=torch.float64)
        if self.with_gram:
            self.gram = torch.zeros(self.features, self.features, dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        """Add the tokens of x [..., features]."""
        if x.shape[-1] != self.features:
            raise ValueError(f"input statistics of {self.features} features cannot take a tensor of shape "
                             f"{tuple(x.shape)}")
        rows = x.detach().reshape(-1, self.features).to(device="cpu", dtype=torch.float64)
        self.tokens += rows.shape[0]
        self.sum_squares += rows.pow(2).sum(0)
        if self.with_gram:
            self.gram += rows.T @ rows

    @property
    def norms(self) -> torch.Tensor:
        """||x_j|| over every token seen, [features] float64."""
        return self.sum_squares.sqrt()

    @classmethod
    def of(cls, x: torch.Tensor, with_gram: bool = False) -> InputStats:
        stats = cls(x.shape[-1], with_gram)
        stats.update(x)
        return stats
