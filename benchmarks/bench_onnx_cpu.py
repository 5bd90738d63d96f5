"""ONNX Runtime CPU time of long-context models before and after relinear's linear-attention rewrite.

Two random-weight models with 2 layers: a BERT-like encoder (bidirectional, max_position_embeddings 8192)
and a Llama decoder (causal, GQA). Each is exported with the dynamo exporter (dynamic batch and sequence),
then rewritten to ELU linear attention two ways: `rewrite_onnx` on the exported file (ONNX front end) and
`to_onnx` with a recipe (torch front end, the ops lowered by `custom_translation_table`). Every session runs
batch 1 at each length; prints a table and saves benchmarks/results/onnx_cpu.json.

    .venv/bin/python benchmarks/bench_onnx_cpu.py [--lengths 4096 8192] [--front-ends onnx torch]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from environment import save_result  # benchmarks/environment.py

from relinear.export import ort
from relinear.export.rewrite_onnx import rewrite_onnx
from relinear.export.to_onnx import to_onnx
from relinear.recipe import LinearAttention, Recipe

RESULTS = Path(__file__).parent / "results" / "onnx_cpu.json"
RECIPE = Recipe([LinearAttention(feature_map="elu")])
SHAPE = {"hidden": 256, "heads": 4, "kv_heads": 2, "intermediate": 1024, "layers": 2, "vocab": 1000,
         "max_positions": 8192}


class LastHidden(torch.nn.Module):
    """(input_ids, attention_mask) -> last hidden state: one output, the part attention changes."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def build(kind: str) -> torch.nn.Module:
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

    torch.manual_seed(0)
    s = SHAPE
    if kind == "bert":
        config = BertConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                            num_attention_heads=s["heads"], intermediate_size=s["intermediate"],
                            max_position_embeddings=s["max_positions"])
        return LastHidden(BertModel(config).eval())
    config = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                         num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                         intermediate_size=s["intermediate"], max_position_embeddings=s["max_positions"])
    return LastHidden(LlamaModel(config).eval())


def example(length: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(0, SHAPE["vocab"], (1, length)), torch.ones(1, length, dtype=torch.long)


def export_plain(model: torch.nn.Module, path: str) -> None:
    axes = {0: "batch", 1: "sequence"}
    with torch.no_grad():
        torch.onnx.export(model, example(), path, dynamo=True, verbose=False, external_data=False,
                          input_names=["input_ids", "attention_mask"], dynamic_shapes=(axes, axes))


def median_ms(session: onnxruntime.InferenceSession, feeds: dict, repeats: int) -> float:
    session.run(None, feeds)  # warm-up: allocations, kernel choice
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - tick) * 1e3)
    return statistics.median(times)




def variants(kind: str, folder: str, front_ends: list[str]) -> dict[str, str]:
    """{"original": path, "rewritten (<front end>)": path} for one model."""
    model = build(kind)
    paths = {"original": os.path.join(folder, f"{kind}.onnx")}
    export_plain(model, paths["original"])
    if "onnx" in front_ends:
        paths["rewritten (onnx)"] = os.path.join(folder, f"{kind}_onnx.onnx")
        report = rewrite_onnx(paths["original"], paths["rewritten (onnx)"], RECIPE)
        print(f"{kind}: rewrite_onnx {report.counts} {[s.detail for s in report.sites]}")
    if "torch" in front_ends:
        paths["rewritten (torch)"] = os.path.join(folder, f"{kind}_torch.onnx")
        report = to_onnx(model, example(), paths["rewritten (torch)"], RECIPE)
        print(f"{kind}: to_onnx {report.counts}")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--models", nargs="+", default=["bert", "llama"], choices=["bert", "llama"])
    parser.add_argument("--front-ends", nargs="+", default=["onnx", "torch"], choices=["onnx", "torch"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for kind in args.models:
            paths = variants(kind, folder, args.front_ends)
            sessions = {name: ort.make_session(path) for name, path in paths.items()}
            for length in args.lengths:
                ids, mask = example(length)
                feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
                row = {"model": kind, "T": length}
                outputs = {}
                for name, session in sessions.items():
                    names = [i.name for i in session.get_inputs()]
                    session_feeds = dict(zip(names, feeds.values(), strict=True))
                    row[f"{name} ms"] = median_ms(session, session_feeds, args.repeats)
                    outputs[name] = session.run(None, session_feeds)[0]
                    if not np.isfinite(outputs[name]).all():
                        raise RuntimeError(f"{kind} {name} T={length}: non-finite output")
                if {"rewritten (onnx)", "rewritten (torch)"} <= set(outputs):
                    # both front ends must compute the same linear attention
                    row["onnx vs torch front end rel. RMS"] = ort.output_error(
                        "out", outputs["rewritten (torch)"], outputs["rewritten (onnx)"]).relative_rms
                for name in sessions:
                    if name != "original":
                        row[f"{name} speedup"] = row["original ms"] / row[f"{name} ms"]
                rows.append(row)
                print("  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))

    save_result(args.out, {"onnxruntime": onnxruntime.__version__, "shape": SHAPE, "recipe": RECIPE.to_dict(),
                           "batch": 1, "rows": rows})


if __name__ == "__main__":
    main()
