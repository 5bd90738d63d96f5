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


def test_held_out_windows_never_appear_in_training(split):
    train, held_out = split
    assert len(train) >= 300 and len(held_out) >= 100  # hundreds of windows, not dozens
    assert not {tuple(w) for w in train} & {tuple(w) for w in held_out}
    assert not set(text.TRAIN_MODULES) & set(text.HELD_OUT_MODULES)
    held_out_docs = set(text.docstrings(text.HELD_OUT_MODULES))
    assert not held_out_docs & set(text.docstrings(text.TRAIN_MODULES, exclude=frozenset(held_out_docs)))


def test_too_short_a_window_is_refused():
    with pytest.raises(ValueError, match="length"):
        text.token_windows(WordTokenizer(), 2)
