"""Inputs and error measure shared by the attention kernel tests (not a test module)."""

import torch

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 5e-3}
# a hybrid balance for two heads, both signs in every feature ([H, 3]: window max, log window sum, log linear sum)
BALANCE = torch.tensor([[0.3, -0.5, 0.4], [-0.2, 0.7, -0.6]])


def relative_rms(actual: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """RMS of the error over the RMS of `expected` (or of `scale`, when a gradient is legitimately ~0)."""
    expected = expected.double()
    reference = expected if scale is None else scale.double()
    return ((actual.double() - expected).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt()).item()


def features(*shape, dtype=torch.float32, seed=0):
    """Positive features, as every feature map relinear uses produces."""
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def values(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def key_mask(batch, keys, seed=0):
    mask = torch.rand(batch, keys, generator=torch.Generator().manual_seed(seed)) > 0.3
    mask[0, :] = False  # batch 0 sees no key at all: its outputs must be zeros
    return mask


def attention_inputs(tq, tk, f_dim, v_dim, dtype, heads=2):
    """(phi_q, phi_k, v) for a batch of 2."""
    return (features(2, heads, tq, f_dim, dtype=dtype, seed=1),
            features(2, heads, tk, f_dim, dtype=dtype, seed=2),
            values(2, heads, tk, v_dim, dtype=dtype, seed=3))


def _rms(x: torch.Tensor) -> float:
    return x.double().pow(2).mean().sqrt().item()


def gradient_errors(got, want, scale):
    """relative_rms of each gradient; one the reference makes zero up to float64 rounding (d phi_q when the
    window holds every key, or with a single key) is measured against `scale`, a gradient that cannot vanish."""
    return [relative_rms(g, w, w if _rms(w) > 1e-9 * _rms(scale) else scale) for g, w in zip(got, want, strict=True)]
