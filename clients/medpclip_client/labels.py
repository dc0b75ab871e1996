"""Candidate-label checks shared by the server's `preprocess` and `tokenizer` models."""

from __future__ import annotations

from collections.abc import Sequence

from .imaging import InputError
from .tensors import MAX_LABEL_CHARS, MAX_LABELS


def validate_labels(labels: Sequence[bytes | str], max_labels: int = MAX_LABELS) -> list[str]:
    """UTF-8 labels -> list of str, or InputError naming the first problem."""
    if len(labels) == 0:
        raise InputError(
            "LABELS is empty: send at least one candidate label "
            "(or call medp_clip_image for embeddings and a mask only)"
        )
    if len(labels) > max_labels:
        raise InputError(
            f"{len(labels)} labels given; at most {max_labels} per request "
            "(split the list and compare scores across requests)"
        )
    texts = []
    for i, raw in enumerate(labels):
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        except UnicodeDecodeError:
            raise InputError(f"label {i} is not valid UTF-8") from None
        if not text.strip():
            raise InputError(f"label {i} is empty; every label needs some text")
        if len(text) > MAX_LABEL_CHARS:
            raise InputError(f"label {i} has {len(text)} characters; at most {MAX_LABEL_CHARS}")
        texts.append(text)
    return texts


def load_tokenizer(path: str, context_length: int):
    """A `tokenizers` WordPiece tokenizer padding/truncating to `context_length` (server side;
    imported lazily so the client does not need `tokenizers`)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    # the saved tokenizer already pads/truncates; restate it so a swapped file cannot differ
    tok.enable_truncation(max_length=context_length)
    tok.enable_padding(length=context_length, pad_id=tok.token_to_id("[PAD]"))
    return tok


def tokenize(tok, labels: Sequence[bytes | str], max_labels: int = MAX_LABELS):
    """Validated labels -> (input_ids, attention_mask), int64 [T, L] numpy arrays."""
    import numpy as np

    enc = tok.encode_batch(validate_labels(labels, max_labels))
    return (
        np.array([e.ids for e in enc], dtype=np.int64),
        np.array([e.attention_mask for e in enc], dtype=np.int64),
    )
