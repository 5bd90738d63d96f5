"""`relinear::key_padding_guard` on masks built by hand: it passes key padding [+ causal] (padded queries'
rows are free), raises MaskChangedError on anything else, and its ONNX lowering gives the same key padding
vector and NaN exactly where torch raises."""

import onnxruntime
import pytest
import torch

import relinear as rl
from relinear.export.translation import custom_translation_table
from relinear.passes.attention import GUARD_OP

T = 6
LENGTHS = [6, 4]  # left padding: batch 1's first two keys (and queries) are padding


def _keep(causal: bool, window: int | None = None) -> torch.Tensor:
    """[B, 1, T, T] bool: key padding [& causal] [& a window of `window` keys]."""
    keys = torch.arange(T)[None, :] >= torch.tensor([T - n for n in LENGTHS])[:, None]
    keep = keys[:, None, None, :].expand(len(LENGTHS), 1, T, T).clone()
    offset = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    if causal:
        keep &= offset >= 0
    if window is not None:
        keep &= offset.abs() < window
    return keep


def _additive(keep: torch.Tensor) -> torch.Tensor:
    return torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)


def _padded_rows_open(keep: torch.Tensor) -> torch.Tensor:
    """Padded queries' rows see every key (some implementations do this to avoid NaN): still key padding."""
    padded_query = ~keep[:, :, -1, :]  # [B, 1, T]: key j padding = query j padding
    return keep | padded_query[..., None]


def _alibi(keep: torch.Tensor) -> torch.Tensor:
    offset = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).float()
    return _additive(keep) - 0.5 * offset.clamp(min=0)


# (name, mask, kind, causal, flag_causal, passes)
CASES = [
    ("causal padding", _keep(True), "bool", True, False, True),
    ("padding", _keep(False), "bool", False, False, True),
    ("padded rows open", _padded_rows_open(_keep(True)), "bool", True, False, True),
    ("sliding window", _keep(True, window=3), "bool", True, False, False),
    ("local window", _keep(False, window=3), "bool", False, False, False),
    ("padding only, rewritten causal", _keep(False), "bool", True, False, False),
    ("padding under SDPA's is_causal", _keep(False), "bool", True, True, True),
    ("additive causal padding", _additive(_keep(True)), "additive", True, False, True),
    ("additive window", _additive(_keep(True, window=3)), "additive", True, False, False),
    ("ALiBi", _alibi(_keep(True)), "additive", True, False, False),
    ("masked_fill padding", ~_keep(False), "fill", False, False, True),
    ("masked_fill window", ~_keep(False, window=2), "fill", False, False, False),
]


@pytest.mark.parametrize(("name", "mask", "kind", "causal", "flag", "passes"), CASES, ids=[c[0] for c in CASES])
def test_guard_in_torch(name, mask, kind, causal, flag, passes):
    if passes:
        keys, poison = GUARD_OP(mask, kind, causal, flag, "site")
        assert keys.tolist() == [[True] * 6, [False, False, True, True, True, True]] and poison.item() == 0
    else:
        with pytest.raises(rl.MaskChangedError, match="the attention mask at site is no longer key padding"):
            GUARD_OP(mask, kind, causal, flag, "site")


CONFIGS = sorted({(c[2], c[3], c[4]) for c in CASES})
KINDS = ("bool", "additive", "fill")
BENIGN = {"bool": _keep(True), "additive": _additive(_keep(True)), "fill": ~_keep(False)}


class _Guards(torch.nn.Module):
    """Every (kind, causal, is_causal) configuration at once, one mask input per kind: one export."""

    def forward(self, *masks):
        by_kind = dict(zip(KINDS, masks, strict=True))
        return tuple(x for kind, causal, flag in CONFIGS for x in GUARD_OP(by_kind[kind], kind, causal, flag, "s"))


def test_onnx_lowering_gives_the_same_keys_and_nan_exactly_where_torch_raises():
    program = torch.onnx.export(_Guards(), tuple(BENIGN[k] for k in KINDS), dynamo=True, verbose=False,
                                custom_translation_table=custom_translation_table())
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for name, mask, kind, causal, flag, passes in CASES:
        feeds = {n: (mask if k == kind else BENIGN[k]).numpy() for n, k in zip(names, KINDS, strict=True)}
        outputs = session.run(None, feeds)
        at = 2 * CONFIGS.index((kind, causal, flag))
        keys, poison = (torch.from_numpy(x) for x in outputs[at:at + 2])
        assert bool(poison.isnan()) == (not passes), name
        if passes:
            assert torch.equal(keys, GUARD_OP(mask, kind, causal, flag, "s")[0]), name


def test_opcheck():
    """Schema, fake kernel, autograd registration and AOT dispatch, on a passing mask of each kind; then the
    additive one requiring grad (a learned bias can), without AOT dispatch: its harness sums every output into
    one float, which a bool output cannot join."""
    passing = {kind: (mask, kind, causal, flag, "site") for _, mask, kind, causal, flag, passes in CASES if passes}
    for args in passing.values():
        torch.library.opcheck(GUARD_OP, args)
    learned = BENIGN["additive"].clone().requires_grad_(True)
    torch.library.opcheck(GUARD_OP, (learned, "additive", True, False, "site"),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_a_mask_that_requires_grad_gets_a_zero_gradient():
    """The guard's outputs (a bool vector and a constant zero) do not depend differentiably on the mask.
    Regression: the backward took one gradient while the op returns two, and raised a TypeError."""
    mask = _additive(_keep(True)).requires_grad_(True)
    _, poison = GUARD_OP(mask, "additive", True, False, "site")
    torch.autograd.backward(poison)
    assert torch.equal(mask.grad, torch.zeros_like(mask))
