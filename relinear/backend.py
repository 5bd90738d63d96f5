"""The torch.compile backend: `torch.compile(model, backend="relinear", options={"recipe": recipe})`."""

from __future__ import annotations

import torch


def relinear_backend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None, **kwargs):
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)
