"""Real English text that ships with every Python: the standard library's docstrings (modules, classes,
functions, methods). Used by the demo and the quality benchmark to calibrate and evaluate on natural language
without any download.

- Held-out text: the docstrings of `HELD_OUT_MODULES` and of their own classes, functions and methods, read
  from the imported modules (`docstrings`).
- Training text: the docstrings in the source of every other standard-library module, test suites aside,
  read with `ast` (`source_docstrings`): nothing is imported, so no module runs, and the private helpers count
  too. That is about 2.5x the text of a list of imported modules, and distillation is short of text
  (docs/attention_quality.md, "Notes on training settings").
- Optional extra training text: the docstrings in the source of installed packages (`training_texts`), e.g.
  torch, of which the Makefile installs one exact version.
A docstring on both sides (a re-export, a copied docstring) is kept only on the held-out side, so evaluation
never sees training text. Files and members are visited in sorted order and the training windows shuffled with
a fixed seed, so the corpus depends only on the Python version (and on the added packages' versions).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import random
import re
import sysconfig
import warnings
from pathlib import Path

HELD_OUT_MODULES = tuple(sorted((
    "reprlib", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "smtplib", "socket", "socketserver",
    "sqlite3", "ssl", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "timeit", "tkinter", "tokenize", "trace", "traceback", "turtle", "types", "typing", "unittest",
    "unittest.mock", "urllib.parse", "urllib.request", "uuid", "warnings", "weakref", "wsgiref.simple_server",
    "xml.dom.minidom", "xml.etree.ElementTree", "xmlrpc.client", "zipfile", "zoneinfo",
)))
# Folders of the standard library that hold no library code: test suites and their data, installed packages.
SKIPPED_FOLDERS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
SHUFFLE_SEED = 0

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


def docstrings(modules=HELD_OUT_MODULES, exclude: frozenset[str] = frozenset()) -> list[str]:
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
            _keep(doc, seen, texts)
    return texts


def _keep(doc, seen: set[str], texts: list[str]) -> None:
    """Append the prose of `doc` to `texts` when it is English and not yet in `seen`."""
    text = _prose(doc) if isinstance(doc, str) else ""
    if text not in seen and is_english(text):
        seen.add(text)
        texts.append(text)


def source_modules(root: str | Path | None = None) -> list[tuple[str, Path]]:
    """(dotted name, path) of every module in the source tree `root` (default: this Python's standard
    library), in path order, without the folders in `SKIPPED_FOLDERS`."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    found = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if SKIPPED_FOLDERS.intersection(parts[:-1]):
            continue
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        # the root's own __init__.py when root is a package folder: the package itself
        found.append((".".join(parts) or root.name, path))
    return found


def source_docstrings(root: str | Path | None = None, skip: tuple[str, ...] = HELD_OUT_MODULES,
                      exclude: frozenset[str] = frozenset()) -> list[str]:
    """English docstrings in the source of the modules under `root` (default: the standard library), each
    once, read with `ast` and never imported; modules named in `skip` and their submodules are left out, and
    so are docstrings in `exclude` and files that do not parse (test data, another Python's syntax)."""
    seen, texts = set(exclude), []
    for name, path in source_modules(root):
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        try:
            with warnings.catch_warnings():  # old sources warn about invalid escapes when parsed
                warnings.simplefilter("ignore")
                tree = ast.parse(path.read_bytes())  # bytes: the file's own encoding declaration applies
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                _keep(ast.get_docstring(node, clean=True), seen, texts)
    return texts


def token_windows(tokenizer, length: int, texts: list[str]) -> list[list[int]]:
    """`texts` as one token stream cut into non-overlapping windows of `length` tokens (special tokens
    added)."""
    if length < 3:
        raise ValueError(f"length must be >= 3 (two special tokens and some text), got {length}")
    stream = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    body = length - 2
    return [[tokenizer.cls_token_id, *stream[i:i + body], tokenizer.sep_token_id]
            for i in range(0, len(stream) - body + 1, body)]


def package_root(name: str) -> Path:
    """The source folder of the installed top-level package `name`, found without importing it."""
    spec = importlib.util.find_spec(name) if name.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"no installed package (a folder of modules) named {name!r} to read training text from")
    return Path(next(iter(spec.submodule_search_locations)))


def training_texts(held_out_texts: list[str], packages: tuple[str, ...] = ()) -> list[str]:
    """The standard library's docstrings outside the held-out modules, then those of the installed `packages`,
    each once and none of `held_out_texts`. Within a package every module counts (nothing is skipped)."""
    texts = source_docstrings(exclude=frozenset(held_out_texts))
    for name in packages:
        texts += source_docstrings(package_root(name), skip=(), exclude=frozenset(held_out_texts).union(texts))
    return texts


def train_and_held_out(tokenizer, length: int, packages: tuple[str, ...] = ()
                       ) -> tuple[list[list[int]], list[list[int]]]:
    """(training windows, shuffled; held-out windows, in module order): no module and no docstring on both
    sides. `packages`: installed packages (e.g. "torch") whose docstrings join the standard library's as
    training text (`training_texts`); the held-out text stays the standard library's."""
    held_out_texts = docstrings(HELD_OUT_MODULES)
    texts = training_texts(held_out_texts, packages)
    train = token_windows(tokenizer, length, texts)
    if not train:
        raise RuntimeError(f"no training text: this Python's standard library ({sysconfig.get_paths()['stdlib']}) "
                           f"has too few English docstrings in .py sources for one {length}-token window")
    # Shuffled, since calibration takes batches in order: consecutive windows come from one module.
    random.Random(SHUFFLE_SEED).shuffle(train)
    return train, token_windows(tokenizer, length, held_out_texts)
