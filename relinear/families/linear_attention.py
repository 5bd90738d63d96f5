"""`linear_attention`: softmax attention -> linear attention or the sliding-window hybrid. The matchers and the
rewrite are in `relinear.passes.attention` (torch graphs) and `relinear.export.attention` (ONNX files)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from relinear.families import Family, register
from relinear.recipe import RecipeError, RuleConfig, is_int_at_least, positive_int

FEATURE_MAPS = ("hedgehog", "elu", "relu", "softmax", "taylor")


@dataclasses.dataclass(frozen=True)
class LinearAttention(RuleConfig):
    """Softmax attention -> linear attention; `window > 0` adds exact softmax over a sliding window, and
    `sinks > 0` keeps the first `sinks` attendable keys (e.g. [CLS], BOS) exact for every query as well.
    `balance` (window hybrids only; ignored otherwise) learns how much the linear part weighs against the
    window per query, not only per head (see `LinearizedAttention`). `decay` (pure linear attention only)
    learns per head how fast a key's weight decays with its distance from the query, on each side; `decay=n`
    (n >= 2) learns n such rates per head and side and mixes the n attentions with learned weights."""

    name: ClassVar[str] = "linear_attention"
    feature_map: str = "hedgehog"
    window: int = 0
    gate: str | None = None
    feature_dim: int | None = None
    chunk_size: int | None = None  # None: the device's default (approx.linear_attention.DEFAULT_CHUNK_SIZE)
    sinks: int = 0
    balance: bool = True
    decay: bool | int = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.feature_map not in FEATURE_MAPS:
            raise RecipeError(
                f"linear_attention: feature_map must be one of {', '.join(FEATURE_MAPS)}, "
                f"got {self.feature_map!r}"
            )
        if not is_int_at_least(self.window, 0):
            raise RecipeError(f"linear_attention: window must be an integer >= 0, got {self.window!r}")
        if self.gate not in (None, "liger"):
            raise RecipeError(f"linear_attention: gate must be None or 'liger', got {self.gate!r}")
        if self.feature_dim is not None:
            positive_int(self, "feature_dim", self.feature_dim)
        if self.chunk_size is not None:
            positive_int(self, "chunk_size", self.chunk_size)
        if not is_int_at_least(self.sinks, 0):
            raise RecipeError(f"linear_attention: sinks must be an integer >= 0, got {self.sinks!r}")
        if not isinstance(self.balance, bool):
            raise RecipeError(f"linear_attention: balance must be True or False, got {self.balance!r}")
        if not (isinstance(self.decay, bool) or is_int_at_least(self.decay, 0)):
            raise RecipeError(f"linear_attention: decay must be True, False or a number of rates >= 0, "
                              f"got {self.decay!r}")
        if self.decay and (self.window or self.gate is not None):
            raise RecipeError("linear_attention: decay is for pure linear attention; it needs window=0 and "
                              f"gate=None, got window={self.window}, gate={self.gate!r}")
        if self.sinks and (self.window == 0 or self.gate is not None):
            raise RecipeError("linear_attention: sinks keep keys exact next to a sliding window; they need "
                              f"window > 0 and gate=None, got window={self.window}, gate={self.gate!r}")


FAMILY = register(Family(
    config=LinearAttention,
    example=LinearAttention(feature_map="elu"),
    torch_rules="relinear.passes.attention:attention_rules",
    onnx_rules="relinear.export.attention:AttentionRules",
    translations={op: f"relinear.export.translation:{op}" for op in (
        "linear_attention", "mapped_linear_attention", "hybrid_attention", "gated_linear_attention",
        "bidirectional_gated_linear_attention")},
    kernels=("relinear.kernels.linear_attention",),
))
