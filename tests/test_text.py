"""Calibration text: English prose only, each docstring once, and held-out windows that training never sees."""

import pytest

from relinear import text


class WordTokenizer:
    """Stands in for a Hugging Face tokenizer: one id per distinct word, ids 0 and 1 reserved for CLS / SEP."""

    cls_token_id, sep_token_id = 0, 1

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, sentence, add_special_tokens=False, verbose=True):
        assert not add_special_tokens
        return {"input_ids": [self.vocab.setdefault(w, len(self.vocab) + 2) for w in sentence.split()]}


@pytest.fixture(scope="module")
def split():
    return text.train_and_held_out(WordTokenizer(), 64)


@pytest.fixture(scope="module")
def held_out_docs():
    return text.docstrings(text.HELD_OUT_MODULES)


@pytest.fixture(scope="module")
def training_docs(held_out_docs):
    return text.source_docstrings(exclude=frozenset(held_out_docs))


def test_prose_is_kept_and_code_or_short_text_is_not():
    prose = ("Return a new list containing all items from the iterable in ascending order. A custom key function "
             "can be supplied to customize the sort order, and the reverse flag can be set.")
    code = "f(x: int, *, y=None) -> dict[str, int]; x.__getattr__('y') |= {1: [2, 3]}; " * 3
    assert text.is_english(prose)
    assert not text.is_english(code)
    assert not text.is_english(prose[:100])


def test_docstrings_are_unique_prose_without_doctests_and_respect_exclude():
    docs = text.docstrings(("json", "textwrap"))
    assert len(docs) > 5 and len(set(docs)) == len(docs)
    assert all(text.is_english(d) and ">>>" not in d for d in docs)
    assert text.docstrings(("json", "textwrap")) == docs  # same order on every call
    assert text.docstrings(("json", "textwrap"), exclude=frozenset(docs[:2])) == docs[2:]


def test_missing_modules_are_skipped():
    assert text.docstrings(("no_such_module_anywhere", "json")) == text.docstrings(("json",))


def test_windows_have_the_length_and_special_tokens(split):
    for windows in split:
        assert windows and all(len(w) == 64 and w[0] == 0 and w[-1] == 1 for w in windows)


def test_held_out_windows_never_appear_in_training(split, held_out_docs, training_docs):
    train, held_out = split
    assert len(train) >= 300 and len(held_out) >= 100  # hundreds of windows, not dozens
    assert not {tuple(w) for w in train} & {tuple(w) for w in held_out}
    assert not set(held_out_docs) & set(training_docs)


def test_training_text_skips_the_held_out_modules_and_the_test_suites():
    names = [name for name, _ in text.source_modules()]
    assert "json" in names and "email.message" in names and "unittest.mock" in names
    assert "idlelib" in names and "idlelib.idle_test" not in names and "test" not in names
    assert not [n for n in names if {"test", "tests", "idle_test"} & set(n.split("."))]
    held_out_docs = set(text.docstrings(("shlex", "textwrap")))
    assert held_out_docs and not held_out_docs & set(text.source_docstrings())


def _write(root, relative, source):
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)


PROSE = ("Read the configuration from the given file and return a mapping of section names to their values, "
         "so that callers never have to parse the file themselves.")


def test_source_docstrings_read_without_importing(tmp_path):
    # Importing either module would stop the test run; reading their source must not.
    _write(tmp_path, "alpha.py", f'"""{PROSE}"""\nraise SystemExit("imported")\n')
    _write(tmp_path, "pkg/__init__.py", f'class Reader:\n    def read(self):\n        """{PROSE} Twice."""\n'
                                        'import os; os._exit(3)\n')
    _write(tmp_path, "pkg/test/test_alpha.py", f'"""{PROSE} From a test."""\n')
    _write(tmp_path, "broken.py", f'"""{PROSE} Broken."""\ndef (:\n')
    _write(tmp_path, "held.py", f'"""{PROSE} Held out."""\n')
    _write(tmp_path, "copy.py", f'"""{PROSE}"""\n')  # the same docstring again: kept once
    assert [n for n, _ in text.source_modules(tmp_path)] == ["alpha", "broken", "copy", "held", "pkg"]
    docs = text.source_docstrings(tmp_path, skip=("held",))
    assert docs == [PROSE, f"{PROSE} Twice."]
    assert text.source_docstrings(tmp_path, skip=(), exclude=frozenset({PROSE})) == [f"{PROSE} Held out.",
                                                                                     f"{PROSE} Twice."]


def test_package_text_joins_training_once_and_never_held_out(tmp_path, monkeypatch):
    held = text.docstrings(("textwrap",))[0]
    stdlib = text.source_docstrings()[0]
    # importing the package would stop the test run: its text must be read from source
    _write(tmp_path, "talkative/__init__.py", f'"""{PROSE}"""\nraise SystemExit("imported")\n')
    _write(tmp_path, "talkative/copies.py", f'"""{held}"""\ndef f():\n    """{stdlib}"""\n'
                                            f'def g():\n    """{PROSE} Again."""\n')
    _write(tmp_path, "talkative/tests/test_it.py", f'"""{PROSE} Tested."""\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    assert text.package_root("talkative") == tmp_path / "talkative"
    texts = text.training_texts([held], ("talkative",))
    assert texts[-2:] == [PROSE, f"{PROSE} Again."]  # after the standard library's, in path order
    assert held not in texts and texts.count(stdlib) == 1 and len(set(texts)) == len(texts)


@pytest.mark.parametrize("name", ["no_such_package_anywhere", "json.decoder", "textwrap"])
def test_a_missing_package_is_named(name):
    with pytest.raises(ValueError, match=f"no installed package .* named '{name}'"):
        text.package_root(name)


def test_no_source_text_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(text, "source_docstrings", lambda **kwargs: [])
    with pytest.raises(RuntimeError, match="no training text"):
        text.train_and_held_out(WordTokenizer(), 64)


def test_too_short_a_window_is_refused():
    with pytest.raises(ValueError, match="length"):
        text.token_windows(WordTokenizer(), 2, ["some words"])


def test_training_windows_are_shuffled_the_same_way_every_time(split, training_docs):
    again, _ = text.train_and_held_out(WordTokenizer(), 64)
    assert again == split[0]
    in_order = text.token_windows(WordTokenizer(), 64, training_docs)
    assert again != in_order and sorted(again) == sorted(in_order)  # the same windows, in another order
