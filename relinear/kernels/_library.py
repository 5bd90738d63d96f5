"""One way to declare a relinear custom op: `torch.ops.relinear.<name>`.

Why opaque `custom_op`s and not `triton_op`: on a machine without a GPU, `torch.compile` traces into a
`triton_op`'s kernel and fails, while an opaque op compiles on every device (checked on torch 2.13).
Each op is defined by its plain-torch form (the CPU kernel, and by default the fake kernel and the
autograd formula); a CUDA kernel, when given, launches Triton and falls back to the torch form when
Triton cannot run. Each op's gradient is an opaque op as well, `relinear::<name>_backward`, so that
torch.compile runs it as written (`_define_backward` says why).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import threading
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


def _aliases_any(t: torch.Tensor, tensors) -> bool:
    return any(isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
               for o in tensors)


@functools.cache
def _eager_dispatch_keys() -> tuple:
    """(included, excluded) dispatch keys of plain eager torch: those a new thread starts with."""
    keys = []
    thread = threading.Thread(target=lambda: keys.extend((torch._C._dispatch_tls_local_include_set(),
                                                          torch._C._dispatch_tls_local_exclude_set())))
    thread.start()
    thread.join()
    return tuple(keys)


@contextlib.contextmanager
def _eager_dispatch():
    """Plain eager dispatch inside an op's kernel, so that autograd can record there. The dispatcher runs a kernel
    with autograd's keys excluded (operations record no graph, even under enable_grad); under a TorchDispatchMode
    (AOTAutograd runs one on a compiled function's first call, to check custom ops for aliasing) every key above
    the mode's is excluded, ADInplaceOrView too, and autograd records wrong gradients for in-place operations on
    views. torch.func.vjp fails under such a mode, and does not take the sparse ops' CSR tensors."""
    with torch._C._ForceDispatchKeyGuard(*_eager_dispatch_keys()):
        yield


def _differentiate(torch_form: Kernel, grad_outputs, wanted, inputs) -> list[torch.Tensor]:
    """Gradients of the inputs flagged in `wanted`, by autograd through the torch form."""
    args = list(inputs)
    leaves = []
    for slot, w in enumerate(wanted):
        if w:
            args[slot] = inputs[slot].detach().requires_grad_(True)
            leaves.append(args[slot])
    with torch.enable_grad():
        out = torch_form(*args)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grad_outputs, strict=True) if g is not None and o.requires_grad]
        got = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True)
    return [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, got, strict=True)]


def _gradients_of(name: str, torch_form: Kernel, cuda_backward: Kernel | str | None):
    """The kernel of `relinear::<name>_backward`: gradients of the inputs flagged in `wanted`, by the backward
    kernel for CUDA tensors of an op that has one (`cuda_backward(grad_output, *inputs)` -> grads of the leading
    tensor inputs), else by differentiating the torch form (exact gradients for any op)."""

    def kernel_gradients(grad_outputs, wanted, inputs) -> list[torch.Tensor]:
        got = _resolve(cuda_backward)(grad_outputs[0], *inputs)
        by_slot = dict(zip((slot for slot, a in enumerate(inputs) if isinstance(a, torch.Tensor)), got, strict=False))
        grads = [by_slot.get(slot) for slot, w in enumerate(wanted) if w]
        if any(g is None for g in grads):
            raise RuntimeError(f"relinear::{name}: its CUDA backward kernel gave no gradient for an input that "
                               "needs one")
        return grads

    def gradients(grad_outputs, wanted, *inputs) -> list[torch.Tensor]:
        tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
        with _eager_dispatch(), torch.no_grad():  # as in eager autograd's backward pass
            if cuda_backward is not None and use_kernels(tensors):
                grads = kernel_gradients(grad_outputs, wanted, inputs)
            else:
                grads = _differentiate(torch_form, grad_outputs, wanted, inputs)
        # A custom op's outputs are fresh tensors: autograd passes a gradient through unchanged (an add), and
        # Inductor plans memory by the fake kernel's contiguous layout.
        return [g.clone(memory_format=torch.contiguous_format) if _aliases_any(g, (*grad_outputs, *inputs))
                else g.contiguous() for g in grads]

    return gradients


def _define_backward(name: str, schema: str, torch_form: Kernel, cuda_backward: Kernel | str | None):
    """`relinear::<name>_backward(grad_outputs, wanted, *inputs)` -> the gradients of the inputs flagged in
    `wanted`, in order: the op's backward as one opaque op.

    Opaque, so torch.compile runs it as written. Traced into the graph instead (AOTAutograd decomposes the torch
    form's backward), Inductor compiled it, and torch 2.13's CPU code generator writes the gradient of
    `unfold` (an accumulating index_put of a transposed tile) to doubled offsets when it runs on more than one
    thread: wrong input gradients through the hybrid attention (benchmarks/repro_inductor_tile2d_atomic_add.py).
    """
    arguments = schema[schema.index("(") + 1 : schema.rindex(") ->")]

    def fake(grad_outputs, wanted, *inputs):
        return [torch.empty_like(inputs[slot], memory_format=torch.contiguous_format)
                for slot, w in enumerate(wanted) if w]

    schema = f"(Tensor?[] grad_outputs, bool[] wanted, {arguments}) -> Tensor[]"
    op = torch.library.custom_op(f"relinear::{name}_backward", _gradients_of(name, torch_form, cuda_backward),
                                 mutates_args=(), schema=schema)
    op.register_fake(fake)
    return op


def _autograd_through(backward_op):
    """The op's autograd: saves its inputs and calls `backward_op` for the gradients its inputs need."""

    def setup_context(ctx, inputs, output):
        ctx.tensor_slots = [i for i, a in enumerate(inputs) if isinstance(a, torch.Tensor)]
        ctx.save_for_backward(*(inputs[i] for i in ctx.tensor_slots))
        ctx.inputs = [None if isinstance(a, torch.Tensor) else a for a in inputs]

    def backward(ctx, *grad_outputs):
        args = list(ctx.inputs)
        wanted = [False] * len(args)
        for slot, saved in zip(ctx.tensor_slots, ctx.saved_tensors, strict=True):
            args[slot] = saved
            wanted[slot] = bool(ctx.needs_input_grad[slot]) and saved.is_floating_point()
        if not any(wanted):
            return (None,) * len(args)
        grads = iter(backward_op(list(grad_outputs), wanted, *args))
        return tuple(next(grads) if w else None for w in wanted)

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
    Also registers the gradient op, `relinear::<name>_backward`.
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
    schema = schema or torch.library.infer_schema(torch_form, mutates_args=())
    backward, setup_context = _autograd_through(_define_backward(name, schema, torch_form, cuda_backward))
    op.register_autograd(backward, setup_context=setup_context)
    return op
