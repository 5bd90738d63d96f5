"""One way to declare a relinear custom op: `torch.ops.relinear.<name>`.

Why opaque `custom_op`s and not `triton_op`: on a machine without a GPU, `torch.compile` traces into a
`triton_op`'s kernel and fails, while an opaque op compiles on every device (checked on torch 2.13).
Each op is defined by its plain-torch form (the CPU kernel, and by default the fake kernel and the
autograd formula); a CUDA kernel, when given, launches Triton and falls back to the torch form when
Triton cannot run.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

import torch

Kernel = Callable[..., torch.Tensor]
# op name -> the "module:function" kernels it loads on first CUDA call: the family contract test imports each
LAZY_KERNELS: dict[str, list[str]] = {}


@functools.cache
def triton_available() -> bool:
    """True when Triton kernels can launch: a CUDA device and an importable triton."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _resolve(kernel: Kernel | str) -> Kernel:
    if callable(kernel):
        return kernel
    module, _, attr = kernel.partition(":")
    return getattr(importlib.import_module(module), attr)


def use_kernels(tensors) -> bool:
    """Whether this call's tensors go to the Triton kernels: all on CUDA, and Triton able to launch."""
    return all(t.is_cuda for t in tensors) and triton_available()


def _autograd_through(torch_form: Kernel, cuda_backward: Kernel | str | None = None):
    """Backward by differentiating the torch form (exact gradients for any op), or, for CUDA tensors of an op
    with a backward kernel, by that kernel: `cuda_backward(grad_output, *inputs)` -> grads of the leading
    tensor inputs."""

    def setup_context(ctx, inputs, output):
        ctx.tensor_slots = [i for i, a in enumerate(inputs) if isinstance(a, torch.Tensor)]
        ctx.save_for_backward(*(inputs[i] for i in ctx.tensor_slots))
        ctx.inputs = [None if isinstance(a, torch.Tensor) else a for a in inputs]

    def backward(ctx, grad_output):
        if cuda_backward is not None and use_kernels(ctx.saved_tensors):
            return _kernel_backward(ctx, grad_output)
        args = list(ctx.inputs)
        wants = []
        for slot, saved in zip(ctx.tensor_slots, ctx.saved_tensors, strict=True):
            leaf = saved.detach().requires_grad_(ctx.needs_input_grad[slot] and saved.is_floating_point())
            args[slot] = leaf
            if leaf.requires_grad:
                wants.append((slot, leaf))
        grads: list[torch.Tensor | None] = [None] * len(args)
        if wants:
            with torch.enable_grad():
                out = torch_form(*args)
            got = torch.autograd.grad(out, [leaf for _, leaf in wants], grad_output, allow_unused=True)
            for (slot, leaf), g in zip(wants, got, strict=True):
                grads[slot] = torch.zeros_like(leaf) if g is None else g
        return tuple(grads)

    def _kernel_backward(ctx, grad_output):
        args = list(ctx.inputs)
        for slot, saved in zip(ctx.tensor_slots, ctx.saved_tensors, strict=True):
            args[slot] = saved
        got = _resolve(cuda_backward)(grad_output, *args)
        grads = [None] * len(args)
        for slot, g in zip(ctx.tensor_slots, got, strict=False):
            grads[slot] = g if ctx.needs_input_grad[slot] else None
        return tuple(grads)

    return backward, setup_context


def define_op(
    name: str,
    torch_form: Kernel,
    *,
    schema: str | None = None,
    fake: Kernel | None = None,
    cuda: Kernel | str | None = None,
    cuda_backward: Kernel | str | None = None,
):
    """Register `relinear::<name>` whose CPU kernel is `torch_form` and whose CUDA kernel is `cuda`.

    `torch_form`'s type hints give the schema unless `schema` is passed. `fake` computes only the output's
    shape and dtype; omit it when `torch_form` itself is shape-polymorphic (no Python loops over sizes).
    `cuda` may be "module:function", imported on first CUDA call, so kernels load only where they run;
    `cuda_backward` likewise gives the gradient kernel (else CUDA gradients also differentiate the torch form).
    """
    op = torch.library.custom_op(f"relinear::{name}", torch_form, mutates_args=(), schema=schema)
    LAZY_KERNELS[name] = [k for k in (cuda, cuda_backward) if isinstance(k, str)]
    op.register_fake(fake or torch_form)
    if cuda is not None:

        def cuda_kernel(*args):
            if not triton_available():
                return torch_form(*args)
            return _resolve(cuda)(*args)

        op.register_kernel("cuda")(cuda_kernel)
    backward, setup_context = _autograd_through(torch_form, cuda_backward)
    op.register_autograd(backward, setup_context=setup_context)
    return op
