"""relinear: rewrite models into cheaper ones (linear attention, structured and sparse matrices)."""

import importlib.metadata as _metadata

from relinear.backend import backend, last_report
from relinear.calibrate import calibrate
from relinear.diagnose import HeadError, attention_errors
from relinear.generation import GenerationError, RecurrentDecoder, RecurrentState, generate, greedy, positions
from relinear.recipe import BTT, ActivationApprox, LinearAttention, LowRank, Monarch, Recipe, RecipeError
from relinear.rewrite.offline import TraceError, rewrite
from relinear.rewrite.report import RewriteReport
from relinear.rewrite.user_rule import rule

try:
    __version__ = _metadata.version("relinear")
except _metadata.PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

__all__ = [
    "BTT", "ActivationApprox", "HeadError", "LinearAttention", "LowRank", "Monarch", "Recipe", "RecipeError",
    "RewriteReport", "TraceError", "attention_errors", "backend", "calibrate", "last_report", "rewrite", "rule",
    "GenerationError", "RecurrentDecoder", "RecurrentState", "generate", "greedy", "positions",
]


def __getattr__(name: str):
    """`rl.export` and `rl.testing` load on first use: ONNX and Hypothesis stay off the import path."""
    if name in ("export", "testing"):
        import importlib

        return importlib.import_module(f"relinear.{name}")
    raise AttributeError(f"module 'relinear' has no attribute {name!r}")
