"""Real English text that ships with every Python: the standard library's module docstrings. Used by the
demo and the quality benchmark to calibrate and evaluate on natural language without any download."""

from __future__ import annotations

import importlib
import inspect

MODULES = (
    "argparse", "asyncio", "collections", "concurrent.futures", "contextlib", "csv", "dataclasses", "decimal",
    "difflib", "email", "enum", "fractions", "functools", "heapq", "http.client", "imaplib", "inspect", "ipaddress",
    "json", "logging", "mailbox", "multiprocessing", "optparse", "pathlib", "pickle", "pydoc", "queue", "random",
    "re", "sched", "shutil", "smtplib", "socket", "statistics", "string", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "tkinter", "turtle", "typing", "unittest", "urllib.request", "uuid",
    "warnings", "weakref", "xml.dom.minidom", "zipfile",
)


def docstrings() -> list[str]:
    texts = []
    for name in MODULES:
        try:
            doc = inspect.getdoc(importlib.import_module(name))
        except Exception:  # a module missing from a minimal Python build
            continue
        if doc and len(doc) > 200:
            texts.append(" ".join(doc.split()))
    return texts


def token_windows(tokenizer, length: int) -> list[list[int]]:
    """The docstrings as one token stream cut into windows of `length` tokens (special tokens added)."""
    stream = []
    for text in docstrings():
        stream += tokenizer(text, add_special_tokens=False)["input_ids"]
    body = length - 2
    return [[tokenizer.cls_token_id, *stream[i:i + body], tokenizer.sep_token_id]
            for i in range(0, len(stream) - body + 1, body)]
