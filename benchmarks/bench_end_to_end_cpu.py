"""End to end on CPU: whole models before and after a rewrite, ratios of interleaved samples taken in one run.

- llama: random-config Llama (4 layers, hidden 512, 8 heads, MLP 1376), batch 1, T=4096: elu linear attention +
  Monarch(8) through `rl.rewrite` against eager, and through the backend against `torch.compile` (Inductor) of
  the original.
- minilm: all-MiniLM-L6-v2 (real weights), batch 8 at 128 / 256 / 512 tokens, the demo's recipe.
- hybrid: the hybrid attention module alone (hedgehog, window 64, balance on) against SDPA, B8 H12 D32 T=256.
- bert: random-config BERT (6 layers, hidden 384, 12 heads), batch 1, T=8192, hedgehog + window 64.

Long-context recipes set min_speedup=0: the rewrite's own site timing would run at the 256-token example, where
linear attention does not pay; this benchmark times the whole model at the target length instead.

Prints a table and saves benchmarks/results/end_to_end_cpu.json (machine, versions, load, command).

    python benchmarks/bench_end_to_end_cpu.py [--only llama,minilm,hybrid,bert] [--rounds 5] [--threads 1]
        [--minilm-min-speedup 0]  # 0: every MiniLM site rewritten, whatever its own timing says
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from environment import save_result  # benchmarks/environment.py

import relinear as rl
from relinear.approx.linear_attention import LinearizedAttention
from relinear.demo import demo_recipe, interleaved_ms, load_minilm
from relinear.rewrite import timing

RESULTS = Path(__file__).parent / "results" / "end_to_end_cpu.json"
SECTIONS = ("llama", "minilm", "hybrid", "bert")
VOCAB = 1000


def _ids(batch: int, length: int, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(0))


def _row(name: str, ms: dict[str, float], baseline: str, candidate: str, goal: float) -> dict:
    ratio = ms[baseline] / ms[candidate]
    print(f"{name:<44} {baseline:>12} {ms[baseline]:9.1f} ms  {candidate:>12} {ms[candidate]:9.1f} ms  "
          f"{ratio:6.2f}x  (goal >= {goal}x)", flush=True)
    return {"case": name, "baseline": baseline, "baseline_ms": ms[baseline], "candidate": candidate,
            "candidate_ms": ms[candidate], "speedup": ratio, "goal": goal, "met": ratio >= goal}


def llama(rounds: int) -> list[dict]:
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=512, num_attention_heads=8, num_key_value_heads=8, intermediate_size=1376,
                         num_hidden_layers=4, vocab_size=VOCAB, max_position_embeddings=4096, use_cache=False,
                         attn_implementation="sdpa")
    model = tf.LlamaModel(cfg).eval()
    recipe = rl.Recipe([rl.LinearAttention(feature_map="elu", min_speedup=0), rl.Monarch(nblocks=8, min_speedup=0)])
    fast, _ = rl.rewrite(model, (_ids(1, 256),), recipe, progress=False)
    ids = (_ids(1, 4096),)
    rows = [_row("llama 4x512 T=4096: elu + Monarch(8), rewrite", interleaved_ms(
        {"eager": model, "rewritten": fast}, ids, rounds), "eager", "rewritten", 5.0)]
    inductor = torch.compile(model)
    backend = torch.compile(model, backend="relinear", options={"recipe": recipe})
    rows.append(_row("llama 4x512 T=4096: elu + Monarch(8), backend", interleaved_ms(
        {"inductor": inductor, "backend": backend}, ids, rounds), "inductor", "backend", 5.0))
    return rows


def minilm(rounds: int, min_speedup: float | None = None) -> list[dict]:
    model, _ = load_minilm()
    example = _ids(2, 128, model.config.vocab_size)
    with timing.settings(**({} if min_speedup is None else {"min_speedup": min_speedup})):
        fast, report = rl.rewrite(model, (example, torch.ones_like(example)), demo_recipe(), progress=False)
    print(f"minilm rewrites: {dict(report.counts)}")
    rows = []
    for length in (128, 256, 512):
        ids = _ids(8, length, model.config.vocab_size)
        ms = interleaved_ms({"original": model, "rewritten": fast}, (ids, torch.ones_like(ids)), rounds)
        rows.append(_row(f"minilm batch 8, {length} tokens: demo recipe", ms, "original", "rewritten", 1.0))
    return rows


def hybrid(rounds: int) -> list[dict]:
    torch.manual_seed(0)
    module = LinearizedAttention(12, 32, feature_map="hedgehog", window=64).eval()
    q, k, v = (torch.randn(8, 12, 256, 32) for _ in range(3))
    ms = interleaved_ms({"sdpa": F.scaled_dot_product_attention, "hybrid": module}, (q, k, v), rounds)
    return [_row("hybrid hedgehog w64 B8 H12 D32 T=256 vs SDPA", ms, "sdpa", "hybrid", 1.0)]


def bert(rounds: int) -> list[dict]:
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BertConfig(hidden_size=384, num_attention_heads=12, intermediate_size=1536, num_hidden_layers=6,
                        vocab_size=VOCAB, max_position_embeddings=8192, attn_implementation="sdpa")
    model = tf.BertModel(cfg).eval()
    example = _ids(1, 256)
    recipe = rl.Recipe([rl.LinearAttention(feature_map="hedgehog", window=64, min_speedup=0)])
    fast, _ = rl.rewrite(model, (example, torch.ones_like(example)), recipe, progress=False)
    ids = _ids(1, 8192)
    ms = interleaved_ms({"original": model, "rewritten": fast}, (ids, torch.ones_like(ids)), rounds)
    return [_row("bert 6x384 T=8192: hedgehog + window 64", ms, "original", "rewritten", 10.0)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved samples per model (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--minilm-min-speedup", type=float, default=None,
                        help="min_speedup for the demo recipe's rewrite (0 forces every site; default: the session's)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    chosen = [s for s in args.only.split(",") if s]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; known: {SECTIONS}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}")
    rows = []
    for section in chosen:
        rows += minilm(args.rounds, args.minilm_min_speedup) if section == "minilm" else globals()[section](args.rounds)
    save_result(args.out, {"rounds": args.rounds, "statistic": "median of interleaved wall-clock samples",
                           "load_average_after": os.getloadavg(), "rows": rows})


if __name__ == "__main__":
    main()
