"""Rule families, one module each. A family registers a builder that turns its config into engine rules
(the handler-registry shape of torchao: one config dataclass per technique, one builder per config)."""

from __future__ import annotations

from collections.abc import Callable

from relinear.recipe import Recipe, RuleConfig
from relinear.rewrite.engine import Rule

_BUILDERS: dict[type, Callable[[RuleConfig], list[Rule]]] = {}


def register(config_type: type):
    def deco(fn):
        _BUILDERS[config_type] = fn
        return fn

    return deco


def rules_for(recipe: Recipe) -> list[Rule]:
    """Engine rules for a recipe, in recipe order; a user's own `Rule` passes through."""
    from relinear.passes import activation, attention, dense  # noqa: F401  (registers the built-in families)

    rules: list[Rule] = []
    for item in recipe.rules:
        if isinstance(item, Rule):
            rules.append(item)
            continue
        builder = _BUILDERS.get(type(item))
        if builder is None:
            raise TypeError(f"no rewrite is registered for {type(item).__name__}")
        rules.extend(builder(item))
    return rules
