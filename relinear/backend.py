"""The torch.compile backend: `torch.compile(model, backend="relinear", options={"recipe": recipe})`.

Dynamo hands over parameters as placeholders whose example inputs are the real `nn.Parameter`s, so the new
weights are computed here, at compile time, and enter the graph as constants. Their holder's name carries the
recipe's fingerprint: a changed recipe changes the graph's code, so no compile cache can return a stale artifact.
"""

from __future__ import annotations

import functools

import torch

from relinear.recipe import Recipe
from relinear.rewrite.report import RewriteReport

_last_report: RewriteReport | None = None


def relinear_backend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None, **kwargs):
    from torch._inductor.compile_fx import compile_fx

    global _last_report
    options = dict(options or {})
    recipe = options.pop("recipe", None)
    if options:
        raise ValueError(f"relinear backend: unknown option(s) {sorted(options)} (known: 'recipe')")
    if recipe is not None:
        if not isinstance(recipe, Recipe):
            raise TypeError("relinear backend: options['recipe'] must be a relinear.Recipe, "
                            f"got {type(recipe).__name__}")
        from relinear.passes import rules_for
        from relinear.rewrite.context import GraphContext
        from relinear.rewrite.engine import apply_rules
        from relinear.rewrite.inline import expand_opaque_calls

        expand_opaque_calls(gm)  # nn.MultiheadAttention: the ops torch.export sees, so the same rules fire
        ctx = GraphContext(gm, example_inputs, seed=recipe.seed, trainable=False,
                           holder=f"relinear_{recipe.fingerprint()}")
        _last_report = apply_rules(gm, rules_for(recipe), ctx, progress=False)
    return compile_fx(gm, example_inputs)


def backend(recipe: Recipe):
    """A backend callable bound to `recipe`: `torch.compile(model, backend=rl.backend(recipe))`."""
    return functools.partial(relinear_backend, options={"recipe": recipe})


def last_report() -> RewriteReport | None:
    """The report of the most recent compile that carried a recipe (Dynamo may compile several graphs)."""
    return _last_report
