"""What an attention mask means, reduced to what linear attention can honor: a key-padding vector and a
causal flag. A mask that says more (ALiBi, relative position bias, a custom pattern) is refused.

`explain_mask` runs once at rewrite time on the example mask to prove that the reduction is exact there.
What the example shows need not hold at the next call (a sliding window is invisible below its length), so
unless the mask's shape already proves it (`needs_guard`), the rewritten graph reduces the mask through
`key_padding_guard`, an op that checks the same property on every call and raises `MaskChangedError`
naming the site and what the mask turned out to be.
"""

from __future__ import annotations

import torch

from relinear.kernels._library import define_op

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
    return expand_keys(_last_row_keys(allowed_from(_as_4d(mask), kind)), query)


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
    problems = []
    for causal in ((True,) if is_causal else (False, True)):
        _, problem = _violation(mask, kind, causal, is_causal)
        if problem is None:
            return causal, None
        problems.append(problem)
    return False, f"mask is neither key padding nor causal + key padding on the example inputs: {problems[0]}"


# --- the run-time guard -----------------------------------------------------------------------------------
# A mask proven to be key padding [+ causal] on the example inputs may be something else at a later call: a
# sliding window becomes active once the sequence outgrows it, a 4-D mask input may change pattern. Where the
# graph does not fix the mask's structure (see `needs_guard`), the rewritten graph checks it at every call.


def _as_4d(mask: torch.Tensor) -> torch.Tensor:
    return mask[(None,) * (4 - mask.dim())] if mask.dim() < 4 else mask


def _last_row_keys(allowed: torch.Tensor) -> torch.Tensor:
    """[B, H, Tq, Tk] keep-matrix -> [B, Tk]: the keys the last query row may see, over any head."""
    return allowed[:, :, -1, :].any(dim=1)


def needs_guard(mask_shape: torch.Size, kind: str) -> bool:
    """Whether the graph alone leaves the key-padding reduction unproven. A boolean mask with a single query
    row ([B, 1, 1, Tk], broadcast over queries) is key padding by its shape; an additive one of that shape
    may still carry a bias, which only its values tell (an O(B * Tk) check)."""
    return kind == "additive" or (len(mask_shape) >= 2 and mask_shape[-2] != 1)


def _spans(row: torch.Tensor) -> str:
    """The True positions of a 1-D bool row as ranges: '0-11, 14'."""
    idx = row.nonzero().flatten().tolist()
    spans, start = [], None
    for a, b in zip(idx, [*idx[1:], None], strict=True):
        start = a if start is None else start
        if b != a + 1:
            spans.append(f"{start}" if start == a else f"{start}-{a}")
            start = None
    return ", ".join(spans) or "none"


def _describe(rows: torch.Tensor, query: int, causal: bool) -> str:
    """What one head's keep-matrix [Tq, Tk] is instead of key padding, shown at an offending `query` row."""
    tq, tk = rows.shape
    text = f"query {query} keeps keys [{_spans(rows[query])}], the last query [{_spans(rows[-1])}]"
    kept = rows[query].nonzero().flatten()
    if causal and kept.numel() and int(kept.max()) > tk - tq + query:
        return f"{text}: query {query} sees later keys, so the mask is not causal"
    last, together = int(rows[-1].sum()), int(rows.any(0).sum())
    if last < together:
        return f"{text}: a window (sliding-window or local attention): the last query sees {last} of the " \
               f"{together} keys the queries see together"
    return f"{text}: not one key padding vector for every query"


def _violation(mask: torch.Tensor, kind: str, causal: bool, flag_causal: bool) -> tuple[torch.Tensor, str | None]:
    """(key padding vector [B or 1, Tk], None) when `mask` is key padding [+ causal] on every real query's
    row, else (..., what it is instead)."""
    mask = _as_4d(mask)
    allowed = allowed_from(mask, kind)
    keys = _last_row_keys(allowed)
    if kind == "additive":
        biased = ~((mask == 0) | (mask <= _DROPPED))
        if bool(biased.any()):
            value = mask[biased].flatten()[0].item()
            return keys, (f"its additive values include {value:.4g} besides 0 and values <= -1e4: a bias (ALiBi "
                          "or a relative position bias), which linear attention cannot reproduce")
    tq, tk = allowed.shape[-2:]
    if tq == 1 and not causal:
        return keys, None
    want = keys[:, None, None, :]
    if causal:
        ordered = causal_allowed(tq, tk, mask.device)
        want = want & ordered
        if flag_causal:  # SDPA's is_causal hides what the mask says above the diagonal
            allowed = allowed & ordered
    real = keys[:, tk - tq:] if tq <= tk else torch.ones(keys.shape[0], tq, dtype=torch.bool, device=mask.device)
    wrong = (allowed != want) & real[:, None, :, None]
    if not bool(wrong.any()):
        return keys, None
    b, h, i, _ = (int(x) for x in wrong.nonzero()[0])
    return keys, f"batch {b}, head {h}: {_describe(allowed.expand_as(wrong)[b, h], i, causal)}"


class MaskChangedError(RuntimeError):
    """A rewritten attention met a mask that linear attention cannot honor."""


def _checked_key_padding(mask: torch.Tensor, kind: str, causal: bool, flag_causal: bool, sites: str
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """`relinear::key_padding_guard`: (key padding [B or 1, Tk] bool, poison: a float32 zero), after checking
    that `mask` (of `kind`) is still key padding [+ causal]; raises MaskChangedError naming `sites` and what
    the mask is otherwise.

    An opaque op, so the check runs as written in eager graphs, under Inductor and in exported programs. Its
    ONNX lowering cannot raise (ONNX has no assert): there `poison` becomes NaN, which the rewritten graph
    adds to the attention's output, so a violated guard gives NaN rather than a plausible wrong value.
    """
    keys, problem = _violation(mask, kind, causal, flag_causal)
    if problem is not None:
        raise MaskChangedError(
            f"relinear: the attention mask at {sites} is no longer key padding{' + causal' if causal else ''}: "
            f"{problem}. The site was rewritten to linear attention because its mask had that form on the "
            "example inputs; with this mask the result would be wrong. Rewrite with example inputs that show "
            "the mask's full structure (e.g. longer than the model's sliding window) and relinear leaves this "
            "attention alone, or exclude it with where=.")
    return keys, torch.zeros((), device=mask.device)


def _key_padding_shapes(mask, kind, causal, flag_causal, sites):
    mask = _as_4d(mask)
    return mask.new_empty((mask.shape[0], mask.shape[-1]), dtype=torch.bool), mask.new_empty((), dtype=torch.float32)


key_padding_guard = define_op("key_padding_guard", _checked_key_padding, fake=_key_padding_shapes)


def expand_keys(keys: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Key padding [B or 1, Tk] expanded to the batch of `query`."""
    return keys.expand(query.shape[0], keys.shape[-1])
