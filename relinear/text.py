"""Real English text that ships with every Python: the standard library's docstrings (modules, classes,
functions, methods). Used by the demo and the quality benchmark to calibrate and evaluate on natural language
without any download.

Held-out text comes from modules of its own (`HELD_OUT_MODULES`), and a docstring shared by both sides (a
re-export, a copied docstring) is kept only on the held-out side, so evaluation never sees training text.
Modules and members are visited in sorted order, so the corpus depends only on the Python version.
"""

from __future__ import annotations

import importlib
import inspect
import re
import warnings

TRAIN_MODULES = tuple(sorted((
    "abc", "argparse", "ast", "asyncio", "base64", "bdb", "bisect", "calendar", "cmd", "codecs", "collections",
    "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal",
    "doctest", "email", "email.message", "email.utils", "enum", "filecmp", "fileinput", "fnmatch", "fractions",
    "ftplib", "functools", "gettext", "glob", "graphlib", "gzip", "heapq", "hmac", "html.parser", "http.client",
    "http.server", "imaplib", "inspect", "io", "ipaddress", "json", "locale", "logging", "logging.handlers",
    "mailbox", "mimetypes", "multiprocessing", "numbers", "optparse", "os", "pathlib", "pdb", "pickle",
    "platform", "plistlib", "poplib", "pprint", "profile", "pstats", "pydoc", "queue", "random", "re",
)))
HELD_OUT_MODULES = tuple(sorted((
    "reprlib", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "smtplib", "socket", "socketserver",
    "sqlite3", "ssl", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "timeit", "tkinter", "tokenize", "trace", "traceback", "turtle", "types", "typing", "unittest",
    "unittest.mock", "urllib.parse", "urllib.request", "uuid", "warnings", "weakref", "wsgiref.simple_server",
    "xml.dom.minidom", "xml.etree.ElementTree", "xmlrpc.client", "zipfile", "zoneinfo",
)))
MODULES = TRAIN_MODULES + HELD_OUT_MODULES

MIN_CHARS = 120      # shorter docstrings are mostly signatures and one-liners
MIN_PROSE = 0.75     # share of a docstring's words that are plain words (no code, paths or symbols)
_DOCTEST = re.compile(r"^\s*(>>>|\.\.\.)")
_WORD = re.compile(r"[(\"']?[A-Za-z]+(?:[-'][A-Za-z]+)*[.,;:!?)\"']*")


def _members(module) -> list:
    """The module, then its own classes and functions, then their methods, in name order."""
    prefix = module.__name__
    found = [module]
    for _, obj in sorted(vars(module).items()):
        owner = getattr(obj, "__module__", None) or ""
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and (owner == prefix or owner.startswith(prefix + ".")):
            found.append(obj)
            if inspect.isclass(obj):
                found += [m for _, m in sorted(vars(obj).items()) if inspect.isfunction(m) or isinstance(m, property)]
    return found


def _prose(doc: str) -> str:
    """The docstring's prose: doctest lines dropped, whitespace collapsed."""
    lines = [line for line in doc.splitlines() if not _DOCTEST.match(line)]
    return " ".join(" ".join(lines).split())


def is_english(text: str) -> bool:
    """Long enough and mostly plain words: keeps explanations, drops signatures, tables and code."""
    words = text.split()
    return len(text) >= MIN_CHARS and sum(bool(_WORD.fullmatch(w)) for w in words) >= MIN_PROSE * len(words)


def docstrings(modules=MODULES, exclude: frozenset[str] = frozenset()) -> list[str]:
    """English docstrings of `modules` and their members, each once, none of those in `exclude`."""
    seen, texts = set(exclude), []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except Exception:  # a module missing from a minimal Python build
            continue
        with warnings.catch_warnings():  # members that are deprecated aliases (typing.re) warn when read
            warnings.simplefilter("ignore", DeprecationWarning)
            own_docs = [obj.__doc__ for obj in _members(module)]  # never inherited: a class's own __doc__
        for doc in own_docs:
            text = _prose(doc) if isinstance(doc, str) else ""
            if text not in seen and is_english(text):
                seen.add(text)
                texts.append(text)
    return texts


def token_windows(tokenizer, length: int, modules=MODULES, exclude: frozenset[str] = frozenset()) -> list[list[int]]:
    """The docstrings as one token stream cut into non-overlapping windows of `length` tokens (special tokens
    added)."""
    if length < 3:
        raise ValueError(f"length must be >= 3 (two special tokens and some text), got {length}")
    stream = []
    for text in docstrings(modules, exclude):
        stream += tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    body = length - 2
    return [[tokenizer.cls_token_id, *stream[i:i + body], tokenizer.sep_token_id]
            for i in range(0, len(stream) - body + 1, body)]


def train_and_held_out(tokenizer, length: int) -> tuple[list[list[int]], list[list[int]]]:
    """(training windows, held-out windows): different modules, and no docstring on both sides."""
    held_out_texts = frozenset(docstrings(HELD_OUT_MODULES))
    return (token_windows(tokenizer, length, TRAIN_MODULES, exclude=held_out_texts),
            token_windows(tokenizer, length, HELD_OUT_MODULES))
