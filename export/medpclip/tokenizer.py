"""Training the WordPiece tokenizer (Hugging Face `tokenizers`), saved as one `tokenizer.json`.

The saved JSON carries the vocabulary, normalizer, pre-tokenizer and [CLS]/[SEP] template but no
padding and no truncation: the text context length is the model config's alone
(`cfg.text.context_length`). Every reader loads it with `medpclip_core.labels.load_tokenizer(path,
context_length)`, the server's loader, which pads to that length and refuses longer labels.
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


def train_tokenizer(corpus: Path, vocab_size: int) -> Tokenizer:
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
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return tok


def save_tokenizer(tok: Tokenizer, path: str | Path) -> Path:
    """Write `tok` as `tokenizer.json` without padding or truncation (a copy: `tok` keeps its
    own), so that no fixed context length travels with the file."""
    plain = Tokenizer.from_str(tok.to_str())
    plain.no_padding()
    plain.no_truncation()
    plain.save(str(path))
    return Path(path)


def main() -> None:
    """Regenerate the bundled tokenizer: python -m medpclip.tokenizer"""
    tok = train_tokenizer(ASSETS / "corpus.txt", vocab_size=2048)
    save_tokenizer(tok, DEFAULT_TOKENIZER)
    print(f"wrote {DEFAULT_TOKENIZER} ({tok.get_vocab_size()} tokens)")


if __name__ == "__main__":
    main()
