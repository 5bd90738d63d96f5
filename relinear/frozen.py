"""Backward through weights the compile backend froze raises instead of training nothing.

The backend computes a site's new weights once, at compile time, and hands them to Inductor as constants: the
user's optimizer never sees them, and the weights they replace are no longer read, so they get no gradient.
Training such a graph would silently leave every rewritten site as it was fitted. Inference without
`torch.no_grad()` is common and must keep working, so the refusal waits for a backward pass: a graph compiled
with gradients on gets, at each site that holds new weights, a zero added to its output from `frozen_site`,
whose gradient formula calls `refuse_backward`, an op that raises when it runs. Its fake kernel traces like any
other op, so AOTAutograd builds the backward graph at compile time without raising.
"""

from __future__ import annotations

import torch

HOW_TO_TRAIN = ("To train a rewritten model, rewrite it offline: `fast, report = rl.rewrite(model, example_args, "
                "recipe)` gives nn.Parameters that an optimizer (or `rl.calibrate`) trains, and `torch.compile(fast)` "
                "compiles it. For inference, call the compiled model under torch.no_grad() or torch.inference_mode().")


def refusal(site: str) -> str:
    return (f"relinear backend: backward through {site}, whose new weights were computed when torch.compile "
            "compiled the graph: they are constants, so training would leave them frozen and give the weights "
            f"they replace no gradient. {HOW_TO_TRAIN}")


@torch.library.custom_op("relinear::refuse_backward", mutates_args=())
def refuse_backward(grad: torch.Tensor, site: str) -> torch.Tensor:
    raise RuntimeError(refusal(site))


@refuse_backward.register_fake
def _(grad, site):
    return grad.new_zeros(())


@torch.library.custom_op("relinear::frozen_site", mutates_args=())
def frozen_site(inputs: list[torch.Tensor], site: str) -> torch.Tensor:
    """A zero that depends on `inputs`: added to a site's output, it puts the site on the backward path."""
    return inputs[0].new_zeros(())


@frozen_site.register_fake
def _(inputs, site):
    return inputs[0].new_zeros(())


def _setup_context(ctx, inputs, output):
    tensors, ctx.site = inputs
    ctx.like = [(t.shape, t.dtype) for t in tensors]


def _backward(ctx, grad):
    refused = torch.ops.relinear.refuse_backward(grad, ctx.site)
    return [refused.to(dtype).expand(shape) for shape, dtype in ctx.like], None


frozen_site.register_autograd(_backward, setup_context=_setup_context)


def guard(graph: torch.fx.Graph, output: torch.fx.Node, inputs: list[torch.fx.Node], site: str) -> torch.fx.Node:
    """`output + frozen_site(inputs)`, inserted after `output`: the node to use in place of `output`."""
    with graph.inserting_after(output):
        zero = graph.call_function(torch.ops.relinear.frozen_site.default, (inputs, site))
    with graph.inserting_after(zero):
        return graph.call_function(torch.add, (output, zero))
