"""`rl.rewrite`: the offline front end. torch.export traces the model (dynamic batch and sequence dims), the
engine rewrites the graph, and the result is an `nn.Module` whose new weights are real `nn.Parameter`s."""

from __future__ import annotations

import inspect

import torch
from torch.utils import _pytree as pytree

from relinear.recipe import Recipe, RuleConfig
from relinear.rewrite.context import GraphContext
from relinear.rewrite.engine import apply_rules
from relinear.rewrite.report import RewriteReport


class TraceError(RuntimeError):
    """The model could not be traced; the message says which model and why."""


def _auto_dims(value):
    """Every dim of every tensor input may vary: other batch sizes and sequence lengths than the example."""
    if isinstance(value, torch.Tensor):
        return {i: torch.export.Dim.AUTO for i in range(value.dim())} or None
    return None


def _batch_of_two(values):
    """`values` with a batch of one repeated to two, when every tensor in them has batch (dim 0) 1, else None.
    torch.export fixes a dim whose example size is 1, so a model traced on one example would refuse every other
    batch size; the rows are copies, so the traced code is the same code."""
    tensors = [v for v in pytree.tree_leaves(values) if isinstance(v, torch.Tensor) and v.dim() >= 1]
    if not tensors or any(t.shape[0] != 1 for t in tensors):
        return None
    return pytree.tree_map(lambda v: torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.dim() >= 1 else v,
                           values)


def trace(model: torch.nn.Module, example_args: tuple, example_kwargs: dict | None = None, dynamic: bool = True):
    example_kwargs = example_kwargs or {}
    dynamic_shapes = None
    if dynamic:
        bound = inspect.signature(model.forward).bind(*example_args, **example_kwargs)
        dynamic_shapes = {name: pytree.tree_map(_auto_dims, v) for name, v in bound.arguments.items()}

    def export(args, kwargs):
        return torch.export.export(model, tuple(args), kwargs, strict=False, dynamic_shapes=dynamic_shapes)

    doubled = _batch_of_two((tuple(example_args), example_kwargs)) if dynamic else None
    if doubled is not None:
        try:
            return export(*doubled).module()
        except Exception:  # a model that only takes a batch of one: traced as given below, its batch fixed at 1
            pass
    try:
        ep = export(example_args, example_kwargs)
    except Exception as e:  # torch.export raises many kinds; all mean the same thing to the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        name = type(model).__name__
        raise TraceError(f"could not trace {name} with torch.export: {type(e).__name__}: {first}") from e
    return ep.module()


def _flat_batches(calibration, example_args: tuple, example_kwargs: dict | None) -> list[list]:
    """Each calibration batch as the traced graph's flat inputs. A batch is what `example_args` is (a tuple of
    positional inputs, or one tensor), or a dict of keyword inputs; either way it needs the example's structure."""
    expected = pytree.tree_structure((example_args, example_kwargs or {}))
    flat = []
    for i, batch in enumerate(calibration):
        if isinstance(batch, dict):
            args, kwargs = (), batch
        else:
            args, kwargs = (batch if isinstance(batch, tuple) else (batch,)), example_kwargs or {}
        leaves, structure = pytree.tree_flatten((args, kwargs))
        if structure != expected:
            raise ValueError(f"calibration batch {i} does not have the example inputs' structure "
                             f"(expected {expected}, got {structure})")
        flat.append(leaves)
    return flat


def rewrite(model: torch.nn.Module, example_args, recipe: Recipe, *, example_kwargs: dict | None = None,
            dynamic: bool = True, progress: bool = True, calibration=None) -> tuple[torch.nn.Module, RewriteReport]:
    """Rewrite `model` by `recipe`; returns (new module, report). The original model is not modified.

    `calibration`: an iterable of batches (each like `example_args`, or a dict of keyword inputs) whose
    activations the data-aware rewrites read besides the example's: Wanda scores (`score="wanda"`) and
    whitened low rank (`LowRank(whiten=True)`). The error each site reports is still measured on the example.

    Weights the recipe did not replace are shared with `model`, not copied (a rewrite of a large model costs no
    second copy): training them in the new module changes `model` too. `rl.calibrate(tune=...)` copies what it
    tunes; for other training, rewrite a `copy.deepcopy(model)`."""
    from relinear.families import family_of
    from relinear.passes import rules_for

    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a relinear.Recipe, got {type(recipe).__name__}")
    if not isinstance(example_args, tuple):
        example_args = (example_args,)
    rules = rules_for(recipe)
    gm = trace(model, example_args, example_kwargs, dynamic)
    flat_inputs = pytree.tree_leaves((example_args, example_kwargs or {}))
    batches = _flat_batches(calibration, example_args, example_kwargs) if calibration is not None else None
    whitens = any(family_of(c).dense.inputs(c) == "gram" for c in recipe.rules
                  if isinstance(c, RuleConfig) and family_of(c).dense is not None)
    ctx = GraphContext(gm, flat_inputs, seed=recipe.seed, trainable=True, calibration=batches, gram=whitens)
    report = apply_rules(gm, rules, ctx, progress=progress)
    gm.relinear_report = report
    return gm, report
