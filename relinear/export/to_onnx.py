"""`to_onnx`: a (rewritten) torch model -> an ONNX file that ONNX Runtime runs with standard ops only.

relinear's custom ops reach the dynamo exporter through `custom_translation_table()`, so the file needs no
custom-op library. Every axis of every input stays dynamic unless the model fixes it (`Dim.AUTO`):
batch and sequence of token ids, embeddings and 2-D masks, and the Tq, Tk of a 4-D mask [B, 1, Tq, Tk] too;
a channel count or an image size that the weights fix is fixed by the example. Axes of size 1 other than
the batch stay 1: they are broadcast axes (a mask's head axis), and a dynamic one fails to export. The last
axis of a floating-point [B, D] or [B, T, D] input is its feature width and stays fixed: a structured op
replacing the layer that reads it does not pin it (its fake kernel is shape-polymorphic), and its ONNX
lowering needs it static.
"""

from __future__ import annotations

import os

import torch

from relinear.export import model_io
from relinear.export.translation import custom_translation_table
from relinear.recipe import Recipe
from relinear.rewrite.report import RewriteReport


def _dynamic_axes(value):
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return None
    features = value.dim() - 1 if value.is_floating_point() and value.dim() in (2, 3) else None
    return {i: torch.export.Dim.AUTO for i, size in enumerate(value.shape)
            if (i == 0 or size != 1) and i != features}


# Above this many parameter bytes the weights go to `<file>.data`: protobuf caps one message at 2 GiB.
EXTERNAL_DATA_BYTES = 1 << 30


def to_onnx(
    model: torch.nn.Module,
    example_args: tuple,
    path: str | os.PathLike,
    recipe: Recipe | None = None,
    *,
    dynamic: bool = True,
    opset: int | None = None,
) -> RewriteReport | None:
    """Export `model` (rewritten by `recipe` first when given) to `path`; returns the rewrite report or None.

    The file is written atomically and carries the report in its metadata (`relinear report FILE`).
    """
    if not isinstance(example_args, tuple):
        example_args = (example_args,)
    report = None
    if recipe is not None:
        from relinear.rewrite.offline import rewrite

        model, report = rewrite(model, example_args, recipe, dynamic=dynamic, progress=False)
    dynamic_shapes = tuple(_dynamic_axes(a) for a in example_args) if dynamic else None
    program = torch.onnx.export(
        model, example_args, dynamo=True, dynamic_shapes=dynamic_shapes, opset_version=opset,
        custom_translation_table=custom_translation_table(), optimize=True, verbose=False,
    )
    onnx_model = program.model
    if report is not None:
        onnx_model.metadata_props[model_io.REPORT_KEY] = report.to_json()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model_io.save_atomic(onnx_model, path, external_data=weight_bytes > EXTERNAL_DATA_BYTES)
    return report
