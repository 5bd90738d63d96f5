"""Shared check of the ops' backward kernels on CPU: force the kernel path (TRITON_INTERPRET=1 runs Triton on CPU
tensors), spy on which kernel the op's autograd resolves, and compare gradients with the torch form's autograd."""

import torch

import relinear.kernels._library as library


def gradients(op, inputs, args, seed=1):
    """Gradients of a random projection of op(*inputs, *args) w.r.t. the inputs that require grad."""
    out = op(*inputs, *args)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    wanted = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return torch.autograd.grad((out * weight).sum(), wanted)


def force_kernel_path(monkeypatch) -> list[str]:
    """Send the ops' CUDA kernels (and backward kernels) to Triton on CPU tensors; returns the list that will hold
    every kernel the ops resolve from then on."""
    calls = []
    real = library._resolve

    def spy(kernel):
        calls.append(str(kernel))
        return real(kernel)

    monkeypatch.setattr(library, "use_kernels", lambda tensors: True)
    monkeypatch.setattr(library, "_resolve", spy)
    return calls


def assert_kernel_gradients_match(op, inputs, args, backward_name, monkeypatch):
    reference = gradients(op, inputs, args)
    calls = force_kernel_path(monkeypatch)
    kernel = gradients(op, inputs, args)
    assert any(backward_name in c for c in calls), calls
    assert len(kernel) == len(reference)
    for got, want in zip(kernel, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def forbid_hybrid_fallback(monkeypatch):
    """Make the hybrid's CUDA path fail if it differentiates (or runs) the chunked torch form instead of its
    kernels."""

    def fallback(*args, **kwargs):
        raise AssertionError("the hybrid ran the chunked torch form instead of its kernels")

    monkeypatch.setattr("relinear.kernels.linear_attention.triton_hybrid.hybrid_attention_chunked", fallback)
