"""`detect`: a dense layer whose weight already *is* exactly low-rank, 2:4, block-sparse or Monarch -> that cheaper
form, at no error (`relinear.approx.detect`). Each site takes the detected form's record (op, cost, lowering)
from the registry; a weight with no exact structure is left alone with the reason for each form."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from relinear.approx.detect import Structure, detect_structure
from relinear.families import DenseForm, Family, register
from relinear.recipe import RuleConfig


@dataclasses.dataclass(frozen=True)
class Detect(RuleConfig):
    """Rewrite weights that are exactly of a cheaper form (low rank, 2:4, block-sparse, Monarch) to that form."""

    name: ClassVar[str] = "detect"


@dataclasses.dataclass(frozen=True)
class Found:
    """The setting of a detected site: the structure, shown as e.g. "low_rank rank=3"."""

    structure: Structure

    def __str__(self) -> str:
        return f"{self.structure.kind} {self.structure.detail}"


def form_of(found: Structure | str) -> DenseForm | str:
    """The detected form's dense record, narrowed to the one setting and the tensors detection found; or the
    reason there is none."""
    if isinstance(found, str):
        return found
    from relinear.families import families

    form = next(f.dense for f in families() if f.name == found.kind)
    return dataclasses.replace(
        form, knob="form", settings=lambda cfg, w: [Found(found)], fit=lambda w, setting, inputs=None: found.tensors,
        cost=lambda in_features, out_features, setting: (found.params, 2 * found.params), inputs=lambda cfg: "")


def detected_form(weight) -> DenseForm | str:
    return form_of(detect_structure(weight))


FAMILY = register(Family(
    config=Detect,
    example=Detect(),
    torch_rules="relinear.passes.dense:detect_rules",
    onnx_rules="relinear.export.dense:DetectRules",
))
