"""One normal form for answer words: what grounding, bias grouping and function words share."""

from __future__ import annotations

import pytest

from diffcam.core.words import is_function_word, normalise_word
from diffcam.tasks.rows import ground_words


@pytest.mark.parametrize("raw, normal", [("Circle", "circle"), (" red,", "red"), ("(the", "the"), ('"Square."', "square"),
                                         ("[a]", "a"), ("re-d", "re-d")])
def test_normal_form_drops_case_space_and_clinging_punctuation(raw, normal):
    assert normalise_word(raw) == normal


def test_function_words_and_grounding_use_the_same_form():
    # a word that grounds to an object under one spelling is never a function word under another
    for raw in ("(The", "A.", "and,"):
        assert is_function_word(raw)
    assert not is_function_word("(Circle)")
    assert ground_words(["A", "(Circle)", "circle."], ["circle", "circle"]) == [None, 0, 1]
