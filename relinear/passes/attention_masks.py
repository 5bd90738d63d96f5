"""What an attention mask means, reduced to what linear attention can honor: a key-padding vector and a
causal flag. A mask that says more (ALiBi, relative position bias, a custom pattern) is refused.

`key_mask_from` runs inside the rewritten graph (it is traced by torch.compile, torch.export and the ONNX
exporter); `explain_mask` runs once at rewrite time on the example mask to prove that the reduction is exact.
"""

from __future__ import annotations

import torch

# how the mask enters the scores: "bool" (True = keep, SDPA), "additive" (0 = keep, very negative = drop),
# "fill" (masked_fill: True = drop), "keep" (where(cond, scores, fill): True = keep)
MASK_KINDS = ("bool", "additive", "fill", "keep")
_DROPPED = -1e4  # additive values at or below this drop the key (transformers uses finfo.min or -1e4)


def allowed_from(mask: torch.Tensor, kind: str) -> torch.Tensor:
    """The boolean keep-matrix of a mask of `kind`."""
    if kind == "bool":
        return mask if mask.dtype == torch.bool else mask != 0
    if kind == "additive":
        return mask == 0
    if kind == "fill":
        return ~mask.bool()
    if kind == "keep":
        return mask.bool()
    raise ValueError(f"unknown mask kind {kind!r}; expected one of {MASK_KINDS}")


def key_mask_from(mask: torch.Tensor, kind: str, query: torch.Tensor) -> torch.Tensor:
    """[B, Tk] bool, True = the key may be attended: the last query row, which under a causal+padding mask
    sees every real key, reduced over heads; expanded to the batch of `query`."""
    allowed = allowed_from(mask, kind)
    while allowed.dim() < 4:
        allowed = allowed.unsqueeze(0)
    keys = allowed[:, :, -1, :].any(dim=1)
    return keys.expand(query.shape[0], keys.shape[-1])


def causal_allowed(num_queries: int, num_keys: int, device=None) -> torch.Tensor:
    """Query i (at absolute position num_keys - num_queries + i) may see keys j <= its position."""
    pos = torch.arange(num_queries, device=device) + (num_keys - num_queries)
    return torch.arange(num_keys, device=device)[None, :] <= pos[:, None]


def explain_mask(mask: torch.Tensor | None, kind: str | None, is_causal: bool, q: torch.Tensor, k: torch.Tensor
                 ) -> tuple[bool, str | None]:
    """(causal, reason): whether the example mask equals key padding [& causal]; reason says why not.

    Rows of queries that are themselves padding are not compared: their outputs are meaningless, and some
    implementations unmask such rows entirely to avoid NaN.
    """
    tq, tk = q.shape[-2], k.shape[-2]
    if mask is None:
        if is_causal and tq != tk:
            return False, f"is_causal with {tq} queries and {tk} keys (top-left aligned) is not supported"
        return is_causal, None
    if kind == "additive":
        kept = mask == 0
        if not bool(((mask == 0) | (mask <= _DROPPED)).all()):
            return False, "additive mask carries a bias (values other than 0 and -inf): ALiBi or a relative " \
                          "position bias cannot be reproduced by linear attention"
    else:
        kept = allowed_from(mask, kind)
    if is_causal:
        kept = kept & causal_allowed(tq, tk, mask.device)
    kept4 = kept
    while kept4.dim() < 4:
        kept4 = kept4.unsqueeze(0)
    kept4 = kept4.expand(q.shape[0], q.shape[1], tq, tk)
    keys = key_mask_from(mask, kind, q)
    if is_causal:  # the padding vector must come from the un-causal mask's last row, which is the same row
        keys = keys & causal_allowed(tq, tk, mask.device)[-1]
    real_rows = keys[:, tk - tq:] if tq <= tk else torch.ones(q.shape[0], tq, dtype=torch.bool)
    for causal in ((True,) if is_causal else (False, True)):
        want = keys[:, None, None, :] & (causal_allowed(tq, tk, mask.device) if causal else True)
        same = (want.expand_as(kept4) == kept4).all(dim=(1, 3))  # [B, Tq]
        if bool(same[real_rows].all()):
            return causal, None
    return False, "mask is neither key padding nor causal + key padding on the example inputs"
