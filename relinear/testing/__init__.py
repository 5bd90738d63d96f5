"""Property testing for rewrite rules: the Hypothesis strategies and checks relinear's own suite uses,
public so users hold their own rules (`relinear.rule`) to the same standard.

    import relinear as rl, relinear.testing
    silu = rl.rule(lambda x: x * torch.sigmoid(x), F.silu, name="silu_fusion")
    relinear.testing.check_rule(silu)
"""

from relinear.testing.checks import (
    check_equivalent,
    check_rewrite,
    check_rule,
    for_all,
    linear_attention_formula,
)
from relinear.testing.profiles import load_profile, register_profiles
from relinear.testing.strategies import (
    AttentionCase,
    DenseWeight,
    TinyTransformer,
    TransformerCase,
    activation_inputs,
    attention_inputs,
    dense_weights,
    float_tensors,
    shapes,
    tiny_transformers,
)

__all__ = [
    "AttentionCase", "DenseWeight", "TinyTransformer", "TransformerCase", "activation_inputs",
    "attention_inputs", "check_equivalent", "check_rewrite", "check_rule", "dense_weights", "float_tensors",
    "for_all", "linear_attention_formula", "load_profile", "register_profiles", "shapes", "tiny_transformers",
]
