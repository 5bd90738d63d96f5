"""The torch form of linear attention with its feature map fused: phi(x * sqrt(scale)) of the registry's map.

Only parameter-free elementwise maps fuse: the kernels recompute phi from q and k tile by tile (and its
derivative in the backward), so phi_q, phi_k and their gradients never reach memory.
"""

from __future__ import annotations

import math

import torch

from relinear.approx.feature_maps import FEATURE_MAPS, FeatureMap, make_feature_map

# name -> the kernels' FEATURE_MAP code (0 means the features are given).
FEATURE_MAP_CODES = {"elu": 1, "relu": 2}


def check_fused_map(feature_map: str, scale: float) -> None:
    if feature_map not in FEATURE_MAP_CODES:
        raise ValueError(
            f"feature_map must be one of {sorted(FEATURE_MAP_CODES)} to be fused, got {feature_map!r}"
        )
    if not scale > 0:
        raise ValueError(f"scale must be positive (features are phi(x * sqrt(scale))), got {scale}")


def mapped_features(
    q: torch.Tensor, k: torch.Tensor, feature_map: str, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(phi(q * sqrt(scale)), phi(k * sqrt(scale))) exactly as `LinearizedAttention` computes them unfused."""
    check_fused_map(feature_map, scale)
    phi = make_feature_map(feature_map, q.shape[1], q.shape[-1])
    root = math.sqrt(scale)
    return phi.of_scaled(q, root), phi.of_scaled(k, root)


def fused_map_name(*maps: FeatureMap) -> str | None:
    """The registry name shared by `maps` when the kernels can compute it in place, else None."""
    for name in FEATURE_MAP_CODES:
        if all(type(m) is FEATURE_MAPS[name] for m in maps):
            return name
    return None
