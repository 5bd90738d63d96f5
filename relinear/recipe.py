"""What to rewrite: the base of every rule config, and the `Recipe` that orders them.

Each rewrite family declares its own frozen config dataclass in its module under `relinear/families/`; the
names resolve here too (`relinear.recipe.LowRank`), looked up in the registry. Configs hold no logic beyond
validating their own fields. Every config has a `name` (the rule name used in reports and recipe files),
`where` (a module-path glob), `max_error` (skip a site whose measured relative output error would exceed it)
and `min_speedup` (skip a site whose replacement is not that many times faster, measured; see
`relinear.rewrite.timing`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar


class RecipeError(ValueError):
    """A recipe or rule config that cannot be used; the message names the field."""


@dataclasses.dataclass(frozen=True)
class RuleConfig:
    name: ClassVar[str] = ""
    where: str | None = None
    max_error: float | None = None
    min_speedup: float | None = None  # None: the session's default (`relinear.rewrite.timing`, 1.0); 0: off

    def __post_init__(self) -> None:
        if self.max_error is not None and not self.max_error > 0:
            raise RecipeError(f"{self.name}: max_error must be > 0, got {self.max_error!r}")
        if self.min_speedup is not None and (isinstance(self.min_speedup, bool) or
                                             not isinstance(self.min_speedup, (int, float)) or
                                             not self.min_speedup >= 0):
            raise RecipeError(f"{self.name}: min_speedup must be a number >= 0 (0 turns the speed check off), "
                              f"got {self.min_speedup!r}")
        if self.where is not None and not isinstance(self.where, str):
            raise RecipeError(f"{self.name}: where must be a glob string, got {self.where!r}")

    def selects(self, path: str) -> bool:
        """True when the module path (e.g. ``encoder.layer.0.attention``) is chosen by ``where``."""
        return self.where is None or fnmatch.fnmatchcase(path, self.where)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self)}


def is_int_at_least(value: Any, minimum: int) -> bool:
    """An int (never a bool, which Python counts as one) that is >= minimum."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def positive_int(cfg: RuleConfig, field: str, value: Any, allow_auto: bool = False) -> None:
    if allow_auto and value == "auto":
        return
    if not is_int_at_least(value, 1):
        extra = ' or "auto"' if allow_auto else ""
        raise RecipeError(f"{cfg.name}: {field} must be a positive integer{extra}, got {value!r}")


def config_from_dict(table: Mapping[str, Any], where: str = "recipe") -> RuleConfig:
    """Build a rule config from a recipe-file table; unknown names and fields raise `RecipeError`."""
    from relinear.families import families

    table = dict(table)
    name = table.pop("name", None)
    configs = {f.name: f.config for f in families()}
    if name not in configs:
        known = ", ".join(sorted(configs))
        raise RecipeError(f"{where}: unknown rule name {name!r} (known: {known})")
    cls = configs[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - fields)
    if unknown:
        raise RecipeError(f"{where}: rule {name!r} has no field {unknown[0]!r} (fields: {', '.join(sorted(fields))})")
    return cls(**table)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """An ordered list of rule configs; earlier rules claim a site first. `seed` fixes any randomness."""

    rules: tuple[RuleConfig, ...]
    seed: int = 0

    def __init__(self, rules: Iterable[RuleConfig] = (), seed: int = 0) -> None:
        rules = tuple(rules)
        for r in rules:
            if not isinstance(r, RuleConfig) and not (hasattr(r, "rewrite") and hasattr(r, "find")):
                raise RecipeError(f"recipe: {r!r} is not a rule config (e.g. rl.Monarch(nblocks=4))")
        object.__setattr__(self, "rules", rules)
        object.__setattr__(self, "seed", int(seed))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "recipe") -> Recipe:
        unknown = sorted(set(data) - {"rules", "seed"})
        if unknown:
            raise RecipeError(f"{where}: unknown top-level key {unknown[0]!r} (expected 'rules', 'seed')")
        tables = data.get("rules", [])
        rules = [config_from_dict(t, f"{where}: rules[{i}]") for i, t in enumerate(tables)]
        return cls(rules, seed=data.get("seed", 0))

    @classmethod
    def from_toml(cls, path: str) -> Recipe:
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib

        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise RecipeError(f"{path}: no such recipe file") from None
        except tomllib.TOMLDecodeError as e:
            raise RecipeError(f"{path}: not valid TOML: {e}") from None
        return cls.from_dict(data, where=path)

    def to_dict(self) -> dict[str, Any]:
        # a user's own rule is known by its name and identity: equal names must not share a compiled artifact
        rules = [r.to_dict() if isinstance(r, RuleConfig) else {"name": r.name, "id": id(r)} for r in self.rules]
        return {"seed": self.seed, "rules": rules}

    def fingerprint(self) -> str:
        """A stable hash of the recipe: part of the compile cache key, so a changed recipe never hits."""
        text = json.dumps(self.to_dict(), sort_keys=True, default=repr)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def __getattr__(name: str) -> type[RuleConfig]:
    """`relinear.recipe.<Config>` for every registered family's config (they live in `relinear/families/`)."""
    if name.startswith("__"):  # the import system's questions (`__path__`, ...) are not config names
        raise AttributeError(name)
    from relinear.families import families

    for family in families():
        if family.config.__name__ == name:
            return family.config
    raise AttributeError(f"module 'relinear.recipe' has no attribute {name!r}")
