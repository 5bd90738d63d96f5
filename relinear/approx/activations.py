"""Cheaper activation functions and how to fit them; free of graphs, shared by the torch and ONNX front ends.

A polynomial fit is only trusted on the input range it was fitted on: outside it, the polynomial is replaced
by the activation's asymptotes (0 on the left and x on the right for GELU and SiLU), so a large input never
meets a wildly growing polynomial. The fitted range always covers [-R, R], where R is far enough out that the
asymptotes hold (GELU: 4, off by < 2e-4; SiLU: 8, off by < 3e-3).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

EXACT = {"gelu": lambda x: F.gelu(x), "silu": F.silu}
ASYMPTOTES_FROM = {"gelu": 4.0, "silu": 8.0}
# elementwise operations per value, for the report: rough counts of the usual CPU/GPU implementations
COST = {"gelu": 20, "silu": 12, "tanh": 10, "relu": 1}


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def fit_polynomial(activation: str, lo: float, hi: float, degree: int) -> tuple[float, ...]:
    """Least-squares coefficients (lowest power first) of `activation` on [lo, hi] widened to [-R, R], at
    Chebyshev nodes, in float64. The fit is made in t = (x - mid) / half so the normal equations stay well posed."""
    if activation not in EXACT:
        raise ValueError(f"no polynomial fit for {activation!r}; known: {sorted(EXACT)}")
    if not hi > lo:
        raise ValueError(f"empty fitting range [{lo}, {hi}]")
    if degree < 1:
        raise ValueError(f"degree must be >= 1, got {degree}")
    reach = ASYMPTOTES_FROM[activation]
    lo, hi = min(lo, -reach), max(hi, reach)
    n = 8 * (degree + 1)
    t = torch.cos(math.pi * (torch.arange(n, dtype=torch.float64) + 0.5) / n)
    mid, half = (hi + lo) / 2, (hi - lo) / 2
    y = EXACT[activation](mid + half * t)
    vander = torch.stack([t**p for p in range(degree + 1)], dim=1)
    coeffs = torch.linalg.lstsq(vander, y[:, None]).solution[:, 0]
    return (mid, half, *(float(c) for c in coeffs))


def polynomial_activation(x: torch.Tensor, fit: tuple[float, ...]) -> torch.Tensor:
    """Evaluate a `fit_polynomial` result by Horner's rule inside its range, asymptotes outside it."""
    mid, half, *coeffs = fit
    t = (x - mid) / half
    y = torch.full_like(x, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        y = y * t + c
    return torch.where(t < -1, torch.zeros_like(x), torch.where(t > 1, x, y))
