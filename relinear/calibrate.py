"""`rl.calibrate`: make rewritten attention match the softmax attention it replaced (LoLCATs), and distil
rewritten dense layers (sparse, low-rank, Monarch, BTT...) towards the original model.

Stage 1, attention transfer: every `LinearizedAttention` layer computes, from the same q, k, v, mask and
scale, both its own output and the exact softmax-attention output; the loss is their MSE, and the layer
passes the *softmax* output on, so each layer trains on the inputs it would see in the original model (the
teacher's activations) without running the teacher. Only feature maps and window gates (and balances) train.
Stage 2 (optional, `distill_steps`): MSE between the student's and the teacher's final outputs, the student
running its own linear attention end to end. The feature maps and gates keep training, and so do the weights
that `tune` names (LoLCATs trains LoRA adapters of the attention projections here; relinear tunes the weights
themselves, which save and load like any other). Tuned weights are first copied: a rewritten model shares its
untouched weights with the original, and the teacher must stay the original.
Rewritten dense sites train in stage 2 only, at `tune_lr`: the weights their family's `DenseForm.trains` names
(a sparse form's kept values, with its pruned positions fixed and exactly zero; low-rank factors; Monarch and
BTT blocks) and their biases. A model with no rewritten attention has no stage 1.
`schedule="cosine"` decays every rate to 0 over each stage (measured effect: docs/attention_quality.md).
"""

from __future__ import annotations

import contextlib
import fnmatch
import inspect
import itertools
import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from relinear.approx.linear_attention import LinearizedAttention, repeat_kv
from relinear.kernels.linear_attention.reference import visible_keys
from relinear.passes.dense import dense_site_parameters


def softmax_attention(q, k, v, key_mask=None, causal=False, scale=None) -> torch.Tensor:
    """Exact softmax attention under relinear's conventions (GQA, key padding, end-aligned causal; a query
    that sees no key gives zeros): the target of attention transfer."""
    h = q.shape[1]
    k, v = repeat_kv(k, h), repeat_kv(v, h)
    visible = visible_keys(key_mask, causal, q.shape[-2], k.shape[-2], q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale)
    return torch.where(visible.any(-1, keepdim=True), out, torch.zeros_like(out))


_FORWARD = inspect.signature(LinearizedAttention.forward)


def attention_call(module: LinearizedAttention, args: tuple, kwargs: dict) -> dict:
    """The arguments of one `LinearizedAttention` call by name (q, k, v, key_mask, causal, scale), defaults
    filled in, however the caller passed them: what forward hooks read."""
    bound = _FORWARD.bind(module, *args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


@contextlib.contextmanager
def forward_hooks(layers: Sequence[torch.nn.Module], hook):
    """`hook(module, args, kwargs, output)` on every layer while inside (its return value, if not None,
    replaces the output); removed on the way out, however the block ends."""
    handles = [layer.register_forward_hook(hook, with_kwargs=True) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


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
              steps: int = 100, lr: float = 1e-3, distill_steps: int = 0, tune: str | Sequence[str] = (),
              tune_lr: float = 1e-4, schedule: str = "constant", progress: bool = True) -> list[float]:
    """Train the rewritten attention and dense layers of `student` in place; returns the loss after each step.

    `batches` holds argument tuples (or keyword dicts) shaped like the rewrite's `example_args`; it is
    cycled when shorter than `steps`. `teacher` (the original model) is needed only for `distill_steps`.
    `steps`: attention-transfer steps (none when the model has no rewritten attention). `distill_steps`:
    distillation steps, where the rewritten dense layers train (at `tune_lr`), so a model whose only rewrites
    are dense layers needs them.
    `tune`: glob(s) over `student.named_parameters()` names, e.g. "*attention*", whose weights also train
    during distillation, at `tune_lr` (pretrained weights want a far smaller step than new feature maps; what
    suited MiniLM: docs/attention_quality.md).
    `schedule`: "constant", or "cosine" to decay the rates to 0 over each stage (transfer, distillation).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"calibrate: schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}")
    layers = attention_layers(student)
    dense = dense_site_parameters(student)
    if not layers and not dense:
        raise ValueError("calibrate: the model has no rewritten attention and no rewritten dense layer to train "
                         "(apply rl.LinearAttention or a dense family such as rl.LowRank or rl.Sparse first)")
    if not layers and not distill_steps:
        raise ValueError("calibrate: the model's rewritten dense layers train by distillation only; pass "
                         "distill_steps > 0 and the original model as teacher=")
    if distill_steps and teacher is None:
        raise ValueError("calibrate: distill_steps > 0 needs the original model as teacher=")
    tune = (tune,) if isinstance(tune, str) else tuple(tune)
    if tune and not distill_steps:
        raise ValueError(f"calibrate: tune={tune!r} trains only during distillation; pass distill_steps > 0")
    batches = list(batches)
    if not batches:
        raise ValueError("calibrate: batches is empty")
    params = [p for layer in layers for p in layer.trainable_parameters()]
    if layers and not params:
        raise ValueError("calibrate: the rewritten attention has no trainable parameters (feature map "
                         f"{type(layers[0].feature_map_q).__name__} is fixed and there is no window gate)")
    # the rewritten layers' own parameters already train, whatever `tune` matches
    own = {id(p) for p in params + dense}
    tuned = _own_copies(student, _matching_parameters(student, tune) - own) if tune else []
    frozen = {p: p.requires_grad for p in student.parameters()}
    for p in student.parameters():
        p.requires_grad_(False)
    history: list[float] = []
    try:
        optimizer = None
        if layers:
            optimizer = _with_group(optimizer, params, lr)
            history += _attention_transfer(student, layers, batches, steps, optimizer, schedule, progress)
        if distill_steps:
            optimizer = _with_group(optimizer, dense + tuned, tune_lr)
            history += _distill(student, teacher, batches, distill_steps, optimizer, schedule, progress)
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
    return history


def _with_group(optimizer: torch.optim.Optimizer | None, params: list, lr: float) -> torch.optim.Optimizer | None:
    """`optimizer` (a new Adam when None) also training `params` at `lr`; unchanged when there are none.
    `params` need gradients from here on (not before: an earlier stage would compute them for nothing)."""
    if not params:
        return optimizer
    for p in params:
        p.requires_grad_(True)
    if optimizer is None:
        return torch.optim.Adam(params, lr=lr)
    optimizer.add_param_group({"params": params, "lr": lr})
    return optimizer


SCHEDULES = {
    "constant": lambda step, steps: 1.0,
    "cosine": lambda step, steps: 0.5 * (1 + math.cos(math.pi * step / max(steps, 1))),
}


def _rates(optimizer, schedule: str, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """One stage's learning-rate schedule; each parameter group's rate is scaled from its rate at the start."""
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"] = group.get("initial_lr", group["lr"])
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: SCHEDULES[schedule](step, steps))


def _matching_parameters(model: torch.nn.Module, patterns: tuple[str, ...]) -> set[int]:
    """ids of the parameters whose name (any alias of a shared tensor) matches one of `patterns`."""
    named = list(model.named_parameters(remove_duplicate=False))
    chosen = set()
    for pattern in patterns:
        matches = {id(p) for name, p in named if fnmatch.fnmatchcase(name, pattern)}
        if not matches:
            raise ValueError(f"calibrate: tune pattern {pattern!r} matches no parameter of the student "
                             f"(names look like {named[0][0]!r})")
        chosen |= matches
    return chosen


def _own_copies(model: torch.nn.Module, chosen: set[int]) -> list[torch.nn.Parameter]:
    """Give `model` its own copy of each chosen parameter, every alias of one tensor pointing at one copy."""
    copies: dict[int, torch.nn.Parameter] = {}
    for name, p in list(model.named_parameters(remove_duplicate=False)):
        if id(p) in chosen:
            owner_path, _, attr = name.rpartition(".")
            copies.setdefault(id(p), torch.nn.Parameter(p.detach().clone()))
            model.get_submodule(owner_path).register_parameter(attr, copies[id(p)])
    return list(copies.values())


def _train(batches, steps, optimizer, schedule, progress, desc, loss_of) -> list[float]:
    """One calibration stage: `steps` optimizer steps on `loss_of(batch)`, batches cycled, rates per `schedule`."""
    rates = _rates(optimizer, schedule, steps)
    history = []
    bar = tqdm(itertools.islice(itertools.cycle(batches), steps), total=steps, desc=desc, disable=not progress)
    for batch in bar:
        loss = loss_of(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        rates.step()
        history.append(loss.item())
        bar.set_postfix(loss=f"{history[-1]:.3e}")
    return history


def _attention_transfer(student, layers, batches, steps, optimizer, schedule, progress) -> list[float]:
    losses: list[torch.Tensor] = []

    def teach(module, args, kwargs, output):
        call = attention_call(module, args, kwargs)
        with torch.no_grad():
            target = softmax_attention(call["q"], call["k"], call["v"], call["key_mask"], call["causal"],
                                       call["scale"])
        losses.append(F.mse_loss(output.float(), target.float()))
        return target  # downstream layers see what the original model computes

    def loss_of(batch):
        losses.clear()
        _call(student, batch)
        return torch.stack(losses).mean()

    with forward_hooks(layers, teach):
        return _train(batches, steps, optimizer, schedule, progress, "attention transfer", loss_of)


def _distill(student, teacher, batches, steps, optimizer, schedule, progress) -> list[float]:
    def loss_of(batch):
        with torch.no_grad():
            target = _first_tensor(_call(teacher, batch))
        return F.mse_loss(_first_tensor(_call(student, batch)).float(), target.float())

    return _train(batches, steps, optimizer, schedule, progress, "distillation", loss_of)
