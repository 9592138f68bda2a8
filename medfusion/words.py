"""How a note splits into words: the one rule shared by the default text encoder's fitted
vocabulary (``medfusion.models.text``) and the note lengths ``inspect`` reports
(``medfusion.io.notes``), so the two can never count differently.

NFKC + lower case, then the HuggingFace ``tokenizers`` ``Whitespace`` pre-tokenizer (runs of
word characters, and runs of punctuation)."""

from __future__ import annotations

from typing import Any


def note_normalizer() -> Any:
    """A ``tokenizers`` normalizer: NFKC, then lower case."""
    from tokenizers import normalizers

    return normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])


def note_pre_tokenizer() -> Any:
    """A ``tokenizers`` pre-tokenizer: words and punctuation groups."""
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Whitespace()


def note_words(text: str, normalizer: Any = None, pre_tokenizer: Any = None) -> list[str]:
    """The words of ``text`` under the rule above (pass the two objects to reuse them)."""
    normalizer = normalizer or note_normalizer()
    pre_tokenizer = pre_tokenizer or note_pre_tokenizer()
    return [w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))]
