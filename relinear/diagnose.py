"""`rl.attention_errors`: where rewritten attention misses softmax attention, head by head, and why.

Every rewritten attention layer sees the inputs it would see in the original model (as in attention
transfer, each layer passes the exact softmax output on), and for each head this records
- `relative_error`: sum ||y - y_softmax||^2 / sum ||y_softmax||^2 over the batches;
- `exact_mass`: the mean share of a query's softmax weight that falls on the keys a hybrid with `window`
  and `sinks` would keep exact (queries that see no key left out).
A head with a large error and a large `exact_mass` is one a window of that size would repair: a few dozen
positive features cannot form sharp local weights. What it showed on MiniLM: docs/attention_quality.md
("Choosing a window").
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from relinear.approx.linear_attention import repeat_kv
from relinear.calibrate import _call, attention_call, attention_layers, forward_hooks
from relinear.kernels.linear_attention.reference import exact_keys, visible_keys
from relinear.recipe import is_int_at_least


@dataclass(frozen=True)
class HeadError:
    """How far one head of one rewritten layer is from the softmax attention it replaced."""

    layer: str             # the rewritten module's name in the model
    head: int
    relative_error: float  # squared error of the output relative to the softmax output's squared norm
    exact_mass: float      # mean softmax weight on the keys `window` + `sinks` would keep exact


def attention_errors(model: torch.nn.Module, batches: Iterable, *, window: int = 3, sinks: int = 0) -> list[HeadError]:
    """Per-head error of every rewritten attention layer of `model` on `batches` (argument tuples or keyword
    dicts, as for `rl.calibrate`), with the softmax weight an exact `window` (+ `sinks`) would cover.

    Builds each layer's softmax weights explicitly in float64 (B * H * Tq * Tk of them): meant for the
    sequence lengths one calibrates on, not for very long ones."""
    for name, value in (("window", window), ("sinks", sinks)):
        if not is_int_at_least(value, 0):
            raise ValueError(f"attention_errors: {name} must be an integer >= 0, got {value!r}")
    named = {module: name for name, module in model.named_modules()}
    layers = attention_layers(model)
    if not layers:
        raise ValueError("attention_errors: the model has no rewritten attention (apply rl.LinearAttention first)")
    totals = {layer: torch.zeros(4, layer.num_heads, dtype=torch.float64) for layer in layers}

    def measure(module, args, kwargs, output):
        call = attention_call(module, args, kwargs)
        q, k, v, key_mask, causal, scale = (call[n] for n in ("q", "k", "v", "key_mask", "causal", "scale"))
        scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
        k, v = repeat_kv(k, q.shape[1]).double(), repeat_kv(v, q.shape[1]).double()
        tq, tk = q.shape[-2], k.shape[-2]
        visible = visible_keys(key_mask, causal, tq, tk, q.device)
        weights = torch.softmax((scale * q.double() @ k.mT).masked_fill(~visible, float("-inf")), -1)
        seen = visible.any(-1)  # [B or 1, 1, Tq]
        weights = weights.nan_to_num(0.0)  # a query that sees no key: all -inf, NaN softmax, zero output
        target = weights @ v
        exact = exact_keys(key_mask, causal, window, sinks, tq, tk, q.device)
        mass = (weights * exact).sum(-1)  # [B, H, Tq]
        seen = seen.expand_as(mass)
        totals[module] += torch.stack([
            (output.double() - target).pow(2).sum((0, 2, 3)),
            target.pow(2).sum((0, 2, 3)),
            (mass * seen).sum((0, 2)),
            seen.sum((0, 2)).double(),
        ]).cpu()  # the totals stay on the CPU whatever device the model runs on
        return target.to(output.dtype)  # downstream layers see what the original model computes

    count = 0
    with forward_hooks(layers, measure), torch.no_grad():
        for batch in batches:
            _call(model, batch)
            count += 1
    if not count:
        raise ValueError("attention_errors: batches is empty")
    rows = []
    for layer, (error, norm, mass, queries) in totals.items():
        for head in range(layer.num_heads):
            rows.append(HeadError(named[layer], head, float(error[head] / norm[head]) if norm[head] else 0.0,
                                  float(mass[head] / queries[head]) if queries[head] else 0.0))
    return rows
