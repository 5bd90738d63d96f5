"""`activation_approx`: GELU / SiLU -> a cheaper form. The forms are plain torch functions (`relinear.approx.
activations`), so Inductor fuses them and `to_onnx` writes them in standard ops; the rule is in
`relinear.passes.activation`."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from relinear.families import Family, NotInOnnx, register
from relinear.recipe import RecipeError, RuleConfig, positive_int

ACTIVATION_TARGETS = ("tanh", "poly", "relu")


@dataclasses.dataclass(frozen=True)
class ActivationApprox(RuleConfig):
    """GELU / SiLU -> a cheaper form: `tanh` (GELU's tanh form), `poly` (a least-squares polynomial of `degree`
    on the input range seen in the example, asymptotes outside it), or `relu`."""

    name: ClassVar[str] = "activation_approx"
    target: str = "tanh"
    degree: int = 12

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target not in ACTIVATION_TARGETS:
            raise RecipeError(f"activation_approx: target must be one of {', '.join(ACTIVATION_TARGETS)}, "
                              f"got {self.target!r}")
        positive_int(self, "degree", self.degree)


FAMILY = register(Family(
    config=ActivationApprox,
    example=ActivationApprox(target="tanh"),
    torch_rules="relinear.passes.activation:activation_rules",
    onnx_rules=NotInOnnx("exporters write GELU / SiLU as Erf / Sigmoid expressions or fused ops whose spellings "
                         "vary by exporter and opset; no ONNX-file matcher for them yet"),
))
