"""Feature maps phi for linear attention: phi(q) . phi(k) stands in for exp(q . k).

Callers pass q * sqrt(scale) and k * sqrt(scale), so phi(q) . phi(k) approximates exp(scale * q . k), the
unnormalized softmax weight. Every forward uses only ops with a standard ONNX form (MatMul, Softmax, Exp,
Min, Sub, Relu, Concat, Mul, Add, Reshape), so a rewritten model exports to plain ONNX.

A new map is one small subclass of `FeatureMap` added to `FEATURE_MAPS`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class FeatureMap(nn.Module):
    """phi: [B, H, T, D] -> [B, H, T, out_dim], applied per head.

    Maps whose width follows from `head_dim` reject a different `feature_dim` rather than ignore it.
    `learnable` maps take a `generator` for their initial weights.
    """

    learnable = False

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int | None = None):
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {num_heads}")
        if head_dim < 1:
            raise ValueError(f"head_dim must be >= 1, got {head_dim}")
        if feature_dim is not None and feature_dim < 1:
            raise ValueError(f"feature_dim must be >= 1 or None, got {feature_dim}")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.out_dim = self._out_dim(head_dim, feature_dim)

    def _out_dim(self, head_dim: int, feature_dim: int | None) -> int:
        if feature_dim is not None and feature_dim != head_dim:
            raise ValueError(
                f"feature map {type(self).__name__} has feature_dim = head_dim = {head_dim}; "
                f"got feature_dim={feature_dim}"
            )
        return head_dim

    def of_scaled(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        """phi(x * scale), what attention calls (scale = sqrt of the softmax scale). Maps override it to fold
        the scale into a weight or to work in place on the scaled copy they own: on CPU each elementwise pass
        over [B, H, T, D] costs about as much as the matmuls of bidirectional linear attention."""
        return self(x * scale)


class EluFeatureMap(FeatureMap):
    """elu(x) + 1 (Katharopoulos et al. 2020): positive, ~ 1 + x near 0.

    Computed as (x - min(x, 0)) + exp(min(x, 0)), the same function and gradient (1 at x = 0): CPU elu goes
    through expm1, several times slower than exp. The in-place ops touch no tensor a backward reads.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        negative = x.clamp(max=0)
        return (x - negative).add_(negative.exp_())

    def of_scaled(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        # In place on the scaled copy: few allocations, since on CPU a fresh [B, H, T, D] tensor costs its page
        # faults (~1 us per 4 KiB here). elu's backward reads its output, so under autograd only the scaled
        # copy is reused. Otherwise elu(y) + 1 = max(1 + y, min(exp(y), 1)) (exp(y) >= 1 + y everywhere, < 1
        # for y < 0): plain exp instead of elu's expm1, measured ~25% faster on a [4, 8192, 32] block here.
        scaled = x * scale
        if torch.is_grad_enabled() and scaled.requires_grad:
            return F.elu_(scaled) + 1
        below_one = torch.exp(scaled).clamp_(max=1)
        return torch.maximum(scaled.add_(1), below_one, out=scaled)


class ReluFeatureMap(FeatureMap):
    """relu(x) (SUPRA). Can be all zero for a token: such a query sees nothing and outputs zeros."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x)

    def of_scaled(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        return F.relu_(x * scale)  # relu's backward reads its output, so in place is safe under autograd


class SoftmaxFeatureMap(FeatureMap):
    """softmax over the feature dimension (Liger): positive and bounded, sums to 1 per token."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x, dim=-1)


class TaylorFeatureMap(FeatureMap):
    """[1, x, vec(x x^T) / sqrt(2)] (Based): phi(q) . phi(k) = 1 + q.k + (q.k)^2 / 2, exp to second order.

    The features themselves can be negative; their inner product is >= 1/2, so attention weights stay
    positive and the normalization is well defined.
    """

    def _out_dim(self, head_dim: int, feature_dim: int | None) -> int:
        width = 1 + head_dim + head_dim * head_dim
        if feature_dim is not None and feature_dim != width:
            raise ValueError(f"taylor feature map has feature_dim = 1 + D + D^2 = {width}; got {feature_dim}")
        return width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outer = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) * (1 / math.sqrt(2))
        return torch.cat([torch.ones_like(x[..., :1]), x, outer], dim=-1)


class HedgehogFeatureMap(FeatureMap):
    """[softmax(x W), softmax(-x W)] * exp(x . u), learnable W [H, D, F] and u [H, D] per head (LoLCATs
    Hedgehog plus a learned magnitude); out_dim = 2F.

    Initialization, chosen by measurement (tests/approx/test_feature_maps.py): W = 4 * eye(D, F), plus
    N(0, 0.1^2) noise from `generator` when one is passed. On random q, k whose scores have unit spread,
    this identity-like start gives attention weights clearly closer to softmax's than uniform weights or
    elu + 1 do, while Gaussian random-feature starts (W ~ N(0, 1), Performer-style) are worse than uniform:
    at these norms their self-normalization is too noisy. F defaults to head_dim.

    Why the magnitude: softmax-normalized features give phi(q) . phi(k) <= 2 for every pair, but softmax
    weights are unbounded. exp(q . k) = exp(q . k_mean + q_mean . k - q_mean . k_mean) exp((q - q_mean) .
    (k - k_mean)): the first factor is a per-query times a per-key weight, linear in the exponent, which
    exp(x . u) learns. Attention sinks need it: a sink token draws far more weight than any key inside a window
    (MiniLM: docs/attention_quality.md), which the bounded kernel cannot express. u starts at 0 (pure Hedgehog).
    """

    learnable = True
    init_gain = 4.0
    init_noise = 0.1

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        feature_dim: int | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__(num_heads, head_dim, feature_dim)
        width = self.out_dim // 2
        weight = self.init_gain * torch.eye(head_dim, width).expand(num_heads, head_dim, width).clone()
        if generator is not None:
            weight += self.init_noise * torch.randn(weight.shape, generator=generator)
        self.weight = nn.Parameter(weight)
        self.magnitude = nn.Parameter(torch.zeros(num_heads, head_dim))

    def _out_dim(self, head_dim: int, feature_dim: int | None) -> int:
        return 2 * (feature_dim or head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.of_scaled(x, 1.0)

    def of_scaled(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        # The scale folds into W and u (x is only ever multiplied by them): no scaled copy of x. One matmul
        # against [W, -W], then a softmax over each half: no negation or concat of activations.
        weight = self.weight.to(x.dtype) * scale
        projected = x @ torch.cat([weight, -weight], dim=-1)
        features = torch.softmax(projected.unflatten(-1, (2, -1)), dim=-1).flatten(-2)
        return features * torch.exp(x @ (self.magnitude.to(x.dtype) * scale).unsqueeze(-1))


FEATURE_MAPS: dict[str, type[FeatureMap]] = {
    "hedgehog": HedgehogFeatureMap,
    "elu": EluFeatureMap,
    "relu": ReluFeatureMap,
    "softmax": SoftmaxFeatureMap,
    "taylor": TaylorFeatureMap,
}

def make_feature_map(
    name: str,
    num_heads: int,
    head_dim: int,
    feature_dim: int | None = None,
    generator: torch.Generator | None = None,
) -> FeatureMap:
    """Build the feature map registered as `name`; `generator` seeds learnable maps' initial weights."""
    try:
        cls = FEATURE_MAPS[name]
    except KeyError:
        raise ValueError(f"unknown feature_map {name!r}; known: {sorted(FEATURE_MAPS)}") from None
    if cls.learnable:
        return cls(num_heads, head_dim, feature_dim, generator=generator)
    return cls(num_heads, head_dim, feature_dim)
