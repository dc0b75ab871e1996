"""Candidate-label checks and tokenization shared by the server's `preprocess` and `tokenizer`
models: count, UTF-8, emptiness, characters, and tokens against the text encoder's context."""

from __future__ import annotations

from collections.abc import Sequence

from .errors import InputError
from .tensors import MAX_LABEL_CHARS, MAX_LABELS, TOKEN_BUCKET


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
    """The one tokenizer loader (server, export, reference, training): a `tokenizers` WordPiece
    tokenizer padding to `context_length` and never truncating (imported lazily so the client
    does not need `tokenizers`).

    `context_length` is the model config's (`cfg.text.context_length`, `Dims.L`, the tokenizer
    models' `context_length` parameter); `tokenizer.json` carries none, and any padding or
    truncation a file does carry is replaced here. Truncation is off on purpose: a label longer
    than the context would lose its end silently (two labels differing only there would score
    identically), so `tokenize` refuses it."""
    from tokenizers import Tokenizer

    if int(context_length) < 1:
        raise ValueError(f"context_length must be a positive token count, got {context_length}")
    tok = Tokenizer.from_file(str(path))
    tok.no_truncation()
    tok.enable_padding(length=int(context_length), pad_id=tok.token_to_id("[PAD]"))
    return tok


def context_length(tok) -> int:
    """Tokens per label the text encoder reads: the fixed padding length `load_tokenizer` set."""
    padding = tok.padding
    if not padding or not padding.get("length"):
        # a programming error (a tokenizer not from load_tokenizer), not the caller's input
        raise RuntimeError("the tokenizer pads to no fixed length; load it with load_tokenizer")
    return int(padding["length"])


def check_token_lengths(tok, encodings: Sequence) -> None:
    """InputError naming the first label with more tokens (special ones included) than the
    context length, instead of letting the text encoder read a cut label."""
    limit = context_length(tok)
    for i, enc in enumerate(encodings):
        tokens = sum(enc.attention_mask)  # padding excluded; nothing is truncated
        if tokens > limit:
            special = tok.num_special_tokens_to_add(False)
            raise InputError(
                f"label {i} is {tokens} tokens long; the model reads at most {limit} tokens per "
                f"label (context length, {special} of them special tokens): shorten the label "
                "so that nothing of it is cut off"
            )


def tokenize(tok, labels: Sequence[bytes | str], max_labels: int = MAX_LABELS):
    """Validated labels -> (input_ids, attention_mask), int64 [T, Q] numpy arrays, Q the longest
    label's tokens rounded up to `TOKEN_BUCKET` (at most the context length).

    The one place where the server tokenizes (`preprocess` for medp_clip, `tokenizer` for
    medp_clip_text), so every ensemble taking LABELS refuses the same labels."""
    import numpy as np

    enc = tok.encode_batch(validate_labels(labels, max_labels))
    check_token_lengths(tok, enc)
    ids = np.array([e.ids for e in enc], dtype=np.int64)
    mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
    # Padding is masked out, so the embeddings do not depend on how much of it there is: cut it
    # to the longest label, rounded up to a bucket (at most the context, which padded it).
    longest = int(mask.sum(axis=1).max())
    n = min(mask.shape[1], -(-longest // TOKEN_BUCKET) * TOKEN_BUCKET)
    return ids[:, :n], mask[:, :n]
