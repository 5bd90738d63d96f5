"""`rl.calibrate`: make rewritten attention match the softmax attention it replaced (LoLCATs).

Stage 1, attention transfer: every `LinearizedAttention` layer computes, from the same q, k, v, mask and
scale, both its own output and the exact softmax-attention output; the loss is their MSE, and the layer
passes the *softmax* output on, so each layer trains on the inputs it would see in the original model (the
teacher's activations) without running the teacher. Only feature maps and window gates train.
Stage 2 (optional, `distill_steps`): MSE between the student's and the teacher's final outputs.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from relinear.approx.linear_attention import LinearizedAttention, repeat_kv
from relinear.kernels.linear_attention.reference import visible_keys


def softmax_attention(q, k, v, key_mask=None, causal=False, scale=None) -> torch.Tensor:
    """Exact softmax attention under relinear's conventions (GQA, key padding, end-aligned causal; a query
    that sees no key gives zeros): the target of attention transfer."""
    h = q.shape[1]
    k, v = repeat_kv(k, h), repeat_kv(v, h)
    visible = visible_keys(key_mask, causal, q.shape[-2], k.shape[-2], q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale)
    return torch.where(visible.any(-1, keepdim=True), out, torch.zeros_like(out))


def attention_layers(model: torch.nn.Module) -> list[LinearizedAttention]:
    return [m for m in model.modules() if isinstance(m, LinearizedAttention)]


def _call(model, batch):
    if isinstance(batch, dict):
        return model(**batch)
    return model(*batch) if isinstance(batch, (tuple, list)) else model(batch)


def _first_tensor(output) -> torch.Tensor:
    leaves = [x for x in pytree.tree_leaves(output) if isinstance(x, torch.Tensor) and x.is_floating_point()]
    if not leaves:
        raise ValueError("the model returned no floating-point tensor to distill")
    return leaves[0]


def calibrate(student: torch.nn.Module, teacher: torch.nn.Module | None = None, batches: Iterable = (), *,
              steps: int = 100, lr: float = 1e-3, distill_steps: int = 0, progress: bool = True) -> list[float]:
    """Train the rewritten attention of `student` in place; returns the loss after each step.

    `batches` holds argument tuples (or keyword dicts) shaped like the rewrite's `example_args`; it is
    cycled when shorter than `steps`. `teacher` (the original model) is needed only for `distill_steps`.
    """
    layers = attention_layers(student)
    if not layers:
        raise ValueError("calibrate: the model has no rewritten attention (apply rl.LinearAttention first)")
    if distill_steps and teacher is None:
        raise ValueError("calibrate: distill_steps > 0 needs the original model as teacher=")
    batches = list(batches)
    if not batches:
        raise ValueError("calibrate: batches is empty")
    params = [p for layer in layers for p in layer.trainable_parameters()]
    if not params:
        raise ValueError("calibrate: the rewritten attention has no trainable parameters (feature map "
                         f"{type(layers[0].feature_map_q).__name__} is fixed and there is no window gate)")
    frozen = {p: p.requires_grad for p in student.parameters()}
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    history: list[float] = []
    try:
        history += _attention_transfer(student, layers, batches, steps, optimizer, progress)
        if distill_steps:
            history += _distill(student, teacher, batches, distill_steps, optimizer, progress)
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
    return history


def _attention_transfer(student, layers, batches, steps, optimizer, progress) -> list[float]:
    losses: list[torch.Tensor] = []

    def teach(module, args, kwargs, output):
        q, k, v = args[:3]
        with torch.no_grad():
            target = softmax_attention(q, k, v, kwargs.get("key_mask"), kwargs.get("causal", False),
                                       kwargs.get("scale"))
        losses.append(F.mse_loss(output.float(), target.float()))
        return target  # downstream layers see what the original model computes

    handles = [layer.register_forward_hook(teach, with_kwargs=True) for layer in layers]
    history = []
    try:
        bar = tqdm(itertools.islice(itertools.cycle(batches), steps), total=steps, desc="attention transfer",
                   disable=not progress)
        for batch in bar:
            losses.clear()
            _call(student, batch)
            loss = torch.stack(losses).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            history.append(loss.item())
            bar.set_postfix(loss=f"{history[-1]:.3e}")
    finally:
        for h in handles:
            h.remove()
    return history


def _distill(student, teacher, batches, steps, optimizer, progress) -> list[float]:
    history = []
    bar = tqdm(itertools.islice(itertools.cycle(batches), steps), total=steps, desc="distillation",
               disable=not progress)
    for batch in bar:
        with torch.no_grad():
            target = _first_tensor(_call(teacher, batch))
        loss = F.mse_loss(_first_tensor(_call(student, batch)).float(), target.float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
        bar.set_postfix(loss=f"{history[-1]:.3e}")
    return history
