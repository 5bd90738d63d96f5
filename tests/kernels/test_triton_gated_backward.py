"""The Triton backward of gated (decaying, Liger/GLA) linear attention vs the chunked form's autograd, run on
CPU by Triton's interpreter."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels then run on CPU tensors

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from attention_data import attention_inputs, features, gradient_errors, key_mask, values  # noqa: E402

from relinear.kernels.linear_attention.chunked import gated_linear_attention_chunked  # noqa: E402
from relinear.kernels.linear_attention.triton import gated_linear_attention_backward_cuda  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 5e-3}
CHUNK = 64
NAMES = ("phi_q", "phi_k", "v", "log_decay")

CASES = [  # (Tq, Tk, F, Dv, dtype, masked, decay strength): strong decays reach few keys, weak ones many
    (1, 1, 16, 16, torch.float32, False, 3.0),  # one key: only v gets a gradient
    (63, 63, 16, 64, torch.float32, True, 3.0),
    (65, 65, 64, 16, torch.float32, False, 0.05),
    (127, 127, 16, 16, torch.float32, True, 0.5),
    (1, 127, 32, 16, torch.float32, True, 0.05),
    (40, 30, 16, 16, torch.float32, True, 3.0),  # more queries than keys: queries align to the keys' end
    (65, 65, 64, 32, torch.bfloat16, True, 3.0),
    (127, 127, 16, 64, torch.bfloat16, False, 0.05),
]


@pytest.mark.parametrize(("tq", "tk", "f_dim", "v_dim", "dtype", "masked", "strength"), CASES)
def test_gated_backward_matches_chunked_autograd(tq, tk, f_dim, v_dim, dtype, masked, strength):
    phi_q, phi_k, v = attention_inputs(tq, tk, f_dim, v_dim, dtype)
    log_decay = (-strength * features(2, 2, tk, seed=12)).to(dtype)
    mask = key_mask(2, tk) if masked else None
    grad_out = values(2, 2, tq, v_dim, seed=4)
    grads = gated_linear_attention_backward_cuda(grad_out.to(dtype), phi_q, phi_k, v, log_decay, mask, CHUNK)

    leaves = [t.double().requires_grad_() for t in (phi_q, phi_k, v, log_decay)]
    expected = gated_linear_attention_chunked(*leaves, mask, CHUNK)
    expected_grads = torch.autograd.grad(expected, leaves, grad_out.double())

    assert [g.dtype for g in grads] == [t.dtype for t in (phi_q, phi_k, v, log_decay)]
    errors = gradient_errors(grads, expected_grads, scale=expected_grads[2])
    assert max(errors) <= TOLERANCE[dtype], dict(zip(NAMES, errors, strict=True))
    if masked:
        assert all(torch.isfinite(g).all() for g in grads)
        assert grads[3].masked_select(~mask[:, None, :]).abs().max() == 0  # padding's decay is not used
