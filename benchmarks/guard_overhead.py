"""What the attention-mask guard costs on a BERT-size call.

A rewritten attention whose mask is not key padding by its shape checks the mask at every call
(`relinear::key_padding_guard`, one check per rewritten attention). This times a
random-weight BERT-base (12 layers, hidden 768, 12 heads; transformers builds a [B, 1, T, T] mask) rewritten
to linear attention, with the guard and with the same graph whose guard only reduces the mask without
checking it (and adds no zero to the attention outputs); samples interleaved, fastest of each kept. Also
times the guard op alone against one rewritten attention site and one SDPA call of the same size. Saves
benchmarks/results/guard_overhead.json.

    .venv/bin/python benchmarks/guard_overhead.py [--batch 2] [--length 256] [--rounds 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from environment import save_result  # benchmarks/environment.py

import relinear as rl
from relinear.approx.linear_attention import LinearizedAttention
from relinear.bench.measure import interleaved_ms
from relinear.passes.attention import GUARD_OP
from relinear.passes.attention_masks import key_mask_from
from relinear.rewrite import timing

RESULTS = Path(__file__).parent / "results" / "guard_overhead.json"


def unchecked_guard(mask, kind, causal, flag_causal, sites):
    """The guard's key padding vector without its check."""
    return key_mask_from(mask, kind, mask[:, 0, 0]), None


def without_guards(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """`gm` with every guard unchecked and the (zero) poison no longer added to the attention outputs."""
    for node in list(gm.graph.nodes):
        if node.target is GUARD_OP:
            node.target = unchecked_guard
            for poison in [u for u in node.users if u.args[1] == 1]:
                for add in list(poison.users):
                    add.replace_all_uses_with(add.args[0])
                    gm.graph.erase_node(add)
                gm.graph.erase_node(poison)
    gm.recompile()
    return gm


def best_ms(fns: dict, rounds: int) -> dict[str, float]:
    """Fastest wall time in ms of each function, sampled interleaved after one warm-up call each."""
    return {name: min(samples) for name, samples in interleaved_ms(fns, rounds).items()}


def bert_base():
    import transformers as tf

    cfg = tf.BertConfig(hidden_size=768, num_attention_heads=12, intermediate_size=3072, num_hidden_layers=12,
                        vocab_size=1024, max_position_embeddings=512, attn_implementation="sdpa")
    torch.manual_seed(0)
    return tf.BertModel(cfg).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: least disturbed by neighbours)")
    parser.add_argument("--feature-map", default="elu", help="elu: the cheapest attention, the guard's worst case")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = bert_base()
    b, t = args.batch, args.length
    ids = torch.randint(3, 1024, (b, t), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1:, t - t // 4:] = 0  # right padding on every row but the first
    recipe = rl.Recipe([rl.LinearAttention(feature_map=args.feature_map)])
    with timing.settings(measure=False):  # every site rewritten: this measures the guard, not the speedup
        guarded, report = rl.rewrite(model, (ids,), recipe, example_kwargs={"attention_mask": mask},
                                     progress=False)
    guards = [n for n in guarded.graph.nodes if n.target is GUARD_OP]
    unguarded = without_guards(copy.deepcopy(guarded))

    # one site alone: the guard on the model's mask, a rewritten attention, SDPA, at the model's head shape
    g = torch.Generator().manual_seed(1)
    heads, dim = 12, 64
    q, k, v = (torch.randn(b, heads, t, dim, generator=g) for _ in range(3))
    keys = mask.bool()
    full_mask = keys[:, None, None, :].expand(b, 1, t, t).contiguous()
    site = next(m for m in guarded.modules() if isinstance(m, LinearizedAttention))

    with torch.inference_mode():
        whole = best_ms({"guarded": lambda: guarded(ids, attention_mask=mask),
                         "unguarded": lambda: unguarded(ids, attention_mask=mask)}, args.rounds)
        parts = best_ms({"guard": lambda: GUARD_OP(full_mask, "bool", False, False, "site"),
                         "linear_attention_site": lambda: site(q, k, v, key_mask=keys, scale=dim ** -0.5),
                         "sdpa_site": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=full_mask)},
                        args.rounds * 8)
    fields = {
        "model": "BERT-base config, random weights, sdpa", "batch": b, "length": t, "recipe": repr(recipe),
        "rewrites": report.counts, "guards_in_graph": len(guards), "model_ms": whole,
        "model_ratio_guarded_over_unguarded": whole["guarded"] / whole["unguarded"], "site_ms": parts,
        "guard_over_linear_attention_site": parts["guard"] / parts["linear_attention_site"],
        "guard_over_sdpa_site": parts["guard"] / parts["sdpa_site"],
        "note": "fastest of interleaved samples on a shared, loaded CPU machine",
    }
    print(f"{report.counts}, {len(guards)} guard(s) in the graph; B={b} T={t}")
    print(f"whole model: guarded {whole['guarded']:.1f} ms, unguarded {whole['unguarded']:.1f} ms, "
          f"ratio {fields['model_ratio_guarded_over_unguarded']:.3f}")
    print(f"one site: guard {parts['guard']:.2f} ms, linear attention {parts['linear_attention_site']:.2f} ms, "
          f"SDPA {parts['sdpa_site']:.2f} ms; guard / linear attention site "
          f"{fields['guard_over_linear_attention_site']:.3f}, guard / SDPA site {fields['guard_over_sdpa_site']:.3f}")
    save_result(args.out, fields)


if __name__ == "__main__":
    main()
