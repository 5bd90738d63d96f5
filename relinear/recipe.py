"""What to rewrite: one frozen config dataclass per rewrite family, and the `Recipe` that orders them.

Configs hold no logic beyond validating their own fields; the passes read them. Every config has a
`name` (the rule name used in reports and recipe files), `where` (a module-path glob) and `max_error`
(skip a site whose measured relative output error would exceed it).
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

    def __post_init__(self) -> None:
        if self.max_error is not None and not self.max_error > 0:
            raise RecipeError(f"{self.name}: max_error must be > 0, got {self.max_error!r}")
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


def _positive_int(cfg: RuleConfig, field: str, value: Any, allow_auto: bool = False) -> None:
    if allow_auto and value == "auto":
        return
    if not is_int_at_least(value, 1):
        extra = ' or "auto"' if allow_auto else ""
        raise RecipeError(f"{cfg.name}: {field} must be a positive integer{extra}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class LowRank(RuleConfig):
    """Dense -> two thin matrices by truncated SVD. Give exactly one of rank, ratio, energy."""

    name: ClassVar[str] = "low_rank"
    rank: int | str | None = None
    ratio: float | None = None
    energy: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        given = [f for f in ("rank", "ratio", "energy") if getattr(self, f) is not None]
        if len(given) != 1:
            raise RecipeError(f"low_rank: give exactly one of rank, ratio, energy (got {given or 'none'})")
        if self.rank is not None:
            _positive_int(self, "rank", self.rank, allow_auto=True)
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise RecipeError(f"low_rank: ratio must be in (0, 1], got {self.ratio!r}")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise RecipeError(f"low_rank: energy must be in (0, 1], got {self.energy!r}")
        if self.rank == "auto" and self.max_error is None:
            raise RecipeError('low_rank: rank="auto" needs max_error (the budget it picks the rank for)')


@dataclasses.dataclass(frozen=True)
class Monarch(RuleConfig):
    """Dense -> Monarch (two block-diagonal factors and a fixed permutation), closed-form projection."""

    name: ClassVar[str] = "monarch"
    nblocks: int | str = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive_int(self, "nblocks", self.nblocks, allow_auto=True)
        if self.nblocks == "auto" and self.max_error is None:
            raise RecipeError('monarch: nblocks="auto" needs max_error (the budget it picks nblocks for)')


@dataclasses.dataclass(frozen=True)
class BTT(RuleConfig):
    """Dense -> Block Tensor-Train with `cores` cores and TT-rank `rank` (rank 1, 2 cores ~ Monarch)."""

    name: ClassVar[str] = "btt"
    cores: int = 2
    rank: int | str = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive_int(self, "cores", self.cores)
        if self.cores != 2:
            raise RecipeError(f"btt: only cores=2 is implemented, got {self.cores!r}")
        _positive_int(self, "rank", self.rank, allow_auto=True)
        if self.rank == "auto" and self.max_error is None:
            raise RecipeError('btt: rank="auto" needs max_error (the budget it picks the rank for)')


FEATURE_MAPS = ("hedgehog", "elu", "relu", "softmax", "taylor")


@dataclasses.dataclass(frozen=True)
class LinearAttention(RuleConfig):
    """Softmax attention -> linear attention; `window > 0` adds exact softmax over a sliding window, and
    `sinks > 0` keeps the first `sinks` attendable keys (e.g. [CLS], BOS) exact for every query as well.
    `balance` (window hybrids only; ignored otherwise) learns how much the linear part weighs against the
    window per query, not only per head (see `LinearizedAttention`). `decay` (pure linear attention only)
    learns per head how fast a key's weight decays with its distance from the query, on each side; `decay=n`
    (n >= 2) learns n such rates per head and side and mixes the n attentions with learned weights."""

    name: ClassVar[str] = "linear_attention"
    feature_map: str = "hedgehog"
    window: int = 0
    gate: str | None = None
    feature_dim: int | None = None
    chunk_size: int | None = None  # None: the device's default (approx.linear_attention.DEFAULT_CHUNK_SIZE)
    sinks: int = 0
    balance: bool = True
    decay: bool | int = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.feature_map not in FEATURE_MAPS:
            raise RecipeError(
                f"linear_attention: feature_map must be one of {', '.join(FEATURE_MAPS)}, "
                f"got {self.feature_map!r}"
            )
        if not is_int_at_least(self.window, 0):
            raise RecipeError(f"linear_attention: window must be an integer >= 0, got {self.window!r}")
        if self.gate not in (None, "liger"):
            raise RecipeError(f"linear_attention: gate must be None or 'liger', got {self.gate!r}")
        if self.feature_dim is not None:
            _positive_int(self, "feature_dim", self.feature_dim)
        if self.chunk_size is not None:
            _positive_int(self, "chunk_size", self.chunk_size)
        if not is_int_at_least(self.sinks, 0):
            raise RecipeError(f"linear_attention: sinks must be an integer >= 0, got {self.sinks!r}")
        if not isinstance(self.balance, bool):
            raise RecipeError(f"linear_attention: balance must be True or False, got {self.balance!r}")
        if not (isinstance(self.decay, bool) or is_int_at_least(self.decay, 0)):
            raise RecipeError(f"linear_attention: decay must be True, False or a number of rates >= 0, "
                              f"got {self.decay!r}")
        if self.decay and (self.window or self.gate is not None):
            raise RecipeError("linear_attention: decay is for pure linear attention; it needs window=0 and "
                              f"gate=None, got window={self.window}, gate={self.gate!r}")
        if self.sinks and (self.window == 0 or self.gate is not None):
            raise RecipeError("linear_attention: sinks keep keys exact next to a sliding window; they need "
                              f"window > 0 and gate=None, got window={self.window}, gate={self.gate!r}")


ACTIVATION_TARGETS = ("tanh", "poly", "relu")


@dataclasses.dataclass(frozen=True)
class ActivationApprox(RuleConfig):
    """GELU / SiLU -> a cheaper form: `tanh` (GELU's tanh form), `poly` (a least-squares polynomial of `degree`
    on the input range seen in the example, asymptotes outside it), or `relu`."""

    name: ClassVar[str] = "activation_approx"
    target: str = "tanh"
    degree: int = 12

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target not in ACTIVATION_TARGETS:
            raise RecipeError(f"activation_approx: target must be one of {', '.join(ACTIVATION_TARGETS)}, "
                              f"got {self.target!r}")
        _positive_int(self, "degree", self.degree)


RULE_CONFIGS: dict[str, type[RuleConfig]] = {
    c.name: c for c in (LowRank, Monarch, BTT, LinearAttention, ActivationApprox)
}


def config_from_dict(table: Mapping[str, Any], where: str = "recipe") -> RuleConfig:
    """Build a rule config from a recipe-file table; unknown names and fields raise `RecipeError`."""
    table = dict(table)
    name = table.pop("name", None)
    if name not in RULE_CONFIGS:
        known = ", ".join(sorted(RULE_CONFIGS))
        raise RecipeError(f"{where}: unknown rule name {name!r} (known: {known})")
    cls = RULE_CONFIGS[name]
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
