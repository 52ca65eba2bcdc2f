"""Words of an answer: grouping sub-tokens into words, and the closed function-word list.

SICD (docs/METHOD.md §3) needs to know which words are *function words* — what the model
says whatever the image shows — and Func-IoU (§5) scores their maps separately.
"""

from __future__ import annotations

# Articles, prepositions, conjunctions, pronouns, auxiliaries: a closed list on purpose
# (an open-class word never lands here by accident).
FUNCTION_WORDS = frozenset(
    """
    a an the this that these those some any each every no
    of in on at to from by with without for about over under above below between among
    into onto through behind near beside next up down out off across around
    and or but nor so yet if than then as while because
    i me my mine you your yours he him his she her hers it its we us our ours they them their theirs
    there here what which who whom whose where when how
    is are was were be been being am has have had do does did
    """.split()
)

# Markers that tokenizers put at the start of a word-initial sub-token.
_WORD_START = ("▁", "Ġ", " ")


#: Punctuation that clings to a word in a decoded answer and is not part of it.
_STRIP = ".,;:!?\"'()[]{}"


def normalise_word(word: str) -> str:
    """Lower-case, surrounding whitespace and punctuation removed: the one form in which
    answer words are compared (grounding to objects, grouping by word, function words)."""
    return word.strip().lower().strip(_STRIP)


def is_function_word(word: str) -> bool:
    return normalise_word(word) in FUNCTION_WORDS


def segment_words(tokenizer, pieces: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """Group (canvas position, token id) pairs into words.

    A word-level tokenizer gives one word per token. Sub-word tokenizers mark word
    starts with a leading `▁`/`Ġ`; a token without it continues the previous word.
    """
    if not pieces:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    word_level = backend is not None and type(backend.model).__name__ == "WordLevel"
    if word_level:
        return [[p] for p in pieces]
    tokens = tokenizer.convert_ids_to_tokens([t for _, t in pieces])
    groups: list[list[tuple[int, int]]] = []
    for piece, tok in zip(pieces, tokens):
        starts = not groups or tok.startswith(_WORD_START) or not tok.strip("▁Ġ ").isalnum()
        if starts:
            groups.append([piece])
        else:
            groups[-1].append(piece)
    return groups
