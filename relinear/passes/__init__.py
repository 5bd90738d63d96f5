"""The torch rules of the rewrite families. Each family's record (`relinear.families`) names the function that
builds its rules from its config; `rules_for` turns a recipe into the engine's rule list."""

from __future__ import annotations

from relinear.recipe import Recipe
from relinear.rewrite.engine import Rule


def rules_for(recipe: Recipe) -> list[Rule]:
    """Engine rules for a recipe, in recipe order; a user's own `Rule` passes through."""
    from relinear.families import family_of

    rules: list[Rule] = []
    for item in recipe.rules:
        if isinstance(item, Rule):
            rules.append(item)
            continue
        rules.extend(family_of(item).rules(item))
    return rules
