"""WordPiece tokenizer (Hugging Face `tokenizers`), saved as one `tokenizer.json`.

Padding and truncation to the model's context length are stored in the JSON itself, so the
server's tokenizer model, the export's parity checks and training all encode identically.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece
from tokenizers.trainers import WordPieceTrainer

ASSETS = Path(str(resources.files("medpclip") / "assets"))  # package data
DEFAULT_TOKENIZER = ASSETS / "tokenizer.json"
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_tokenizer(corpus: Path, vocab_size: int, context_length: int) -> Tokenizer:
    """Train a BERT-style (uncased) WordPiece vocabulary on `corpus`."""
    tok = Tokenizer(WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    # Full printable ASCII alphabet, so any English label tokenizes without [UNK].
    alphabet = [chr(c) for c in range(33, 127)]
    trainer = WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=alphabet, min_frequency=1
    )
    tok.train([str(corpus)], trainer)
    return configure(tok, context_length)


def configure(tok: Tokenizer, context_length: int) -> Tokenizer:
    cls_id, sep_id, pad_id = (tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    tok.enable_truncation(max_length=context_length)
    tok.enable_padding(length=context_length, pad_id=pad_id, pad_token="[PAD]")
    return tok


def load_tokenizer(path: str | Path, context_length: int | None = None) -> Tokenizer:
    tok = Tokenizer.from_file(str(path))
    return configure(tok, context_length) if context_length else tok


def main() -> None:
    """Regenerate the bundled tokenizer: python -m medpclip.tokenizer"""
    tok = train_tokenizer(ASSETS / "corpus.txt", vocab_size=2048, context_length=32)
    tok.save(str(DEFAULT_TOKENIZER))
    print(f"wrote {DEFAULT_TOKENIZER} ({tok.get_vocab_size()} tokens)")


if __name__ == "__main__":
    main()
