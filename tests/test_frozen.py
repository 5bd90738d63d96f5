"""`relinear::frozen_site` (frozen.py), the op whose gradient formula refuses backward through weights the compile
backend froze: its registration contracts (opcheck)."""

import torch

import relinear.frozen  # noqa: F401  (registers the ops)

FROZEN_SITE = torch.ops.relinear.frozen_site.default


def test_opcheck():
    """Every check on inputs that need no gradient; with gradients, all but AOT dispatch, whose harness runs the
    backward, which raises by design (tests/test_backend_dynamic.py checks that it does)."""
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g, dtype=torch.float64)]
    torch.library.opcheck(FROZEN_SITE, (inputs, "site"))
    trained = [t.clone().requires_grad_(True) for t in inputs]
    torch.library.opcheck(FROZEN_SITE, (trained, "site"),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
