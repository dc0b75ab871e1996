"""Reference models built with the upstream libraries' own code, for the importers' parity tests.

open_clip (with timm's ViT and a Hugging Face BERT, the BiomedCLIP layout) and segment-anything
construct small models with random weights; the files are saved in the layouts the real
checkpoints have (`open_clip_config.json` + `open_clip_pytorch_model.bin` + tokenizer files;
SAM's `Sam` state dict as a `.pth`), and the same libraries load them back as the references.
Nothing is downloaded: every size is chosen here, every weight is seeded.

torchvision: open_clip, timm and segment-anything import it at package level (transforms, box
ops). PyPI's torchvision wheels link CUDA builds of libtorch, so their compiled ops cannot load
beside the CPU torch build these machines use, and torchvision 0.28 then fails on import while
registering fake kernels for `nms`/`qnms`. `importable_torchvision` declares those two ops'
schemas (no kernels) first, so the pure-Python parts import; nothing here calls them, and a call
would fail loudly ("no kernel"), not compute anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# small sizes, BiomedCLIP's layout: timm ViT-Ti/16 at 224 (its default size), a 2-layer BERT
VISION_MODEL = "vit_tiny_patch16_224"
EMBED_DIM = 48
CONTEXT = 40
BERT = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 192,
    "max_position_embeddings": 64,
}
SAM_DIM, SAM_HEADS = 32, 8  # SAM's decoder has 8 heads at every size


def importable_torchvision() -> None:
    """See the module docstring: declare torchvision's nms/qnms op schemas if it cannot."""
    for op in ("nms", "qnms"):
        if not torch._C._dispatch_has_kernel(f"torchvision::{op}") and not _op_exists(op):
            torch.library.define(
                f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
            )


def _op_exists(op: str) -> bool:
    try:
        getattr(torch.ops.torchvision, op)
        return True
    except (AttributeError, RuntimeError):
        return False


def _perturb(module: torch.nn.Module, seed: int) -> None:
    """Random values in every parameter: LayerNorm ones, zero biases and zero-initialised
    tokens would hide a mapping mistake (a swapped bias, a missing LayerNorm)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def write_vocab(folder: Path, tokenizer_json: Path) -> Path:
    """A BERT vocab.txt (one token per line, ids in order) from our WordPiece tokenizer's."""
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tokenizer_json)).get_vocab()
    path = folder / "vocab.txt"
    path.write_text("".join(t + "\n" for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])))
    return path


# BiomedCLIP's own sizes (ViT-B/16 at 224, BERT-base, context 256, 512-d), for measurements
BASE = {
    "vision": "vit_base_patch16_224",
    "embed_dim": 512,
    "context": 256,
    "bert": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "max_position_embeddings": 512,
    },
}
SMALL = {"vision": VISION_MODEL, "embed_dim": EMBED_DIM, "context": CONTEXT, "bert": BERT}


def biomedclip_folder(
    folder: Path, vocab_from: Path, seed: int = 0, sizes: dict | None = None
) -> Path:
    """A BiomedCLIP-layout folder with a random model that open_clip itself built, at `SMALL`
    sizes (tests) or `BASE` (BiomedCLIP's own; the vocabulary is always `vocab_from`'s)."""
    sizes = sizes or SMALL
    importable_torchvision()
    import open_clip
    from transformers import BertConfig, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = write_vocab(folder, vocab_from)
    ids = {t: i for i, t in enumerate(vocab.read_text().splitlines())}
    tok = BertTokenizerFast(vocab=ids, do_lower_case=True)  # transformers 5: vocab, not a file
    tok.save_pretrained(str(folder))  # tokenizer.json, tokenizer_config.json, special tokens
    vocab_size = len(vocab.read_text().splitlines())
    BertConfig(vocab_size=vocab_size, **sizes["bert"]).save_pretrained(str(folder))
    model_cfg = {
        "embed_dim": sizes["embed_dim"],
        "vision_cfg": {
            "timm_model_name": sizes["vision"],
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "image_size": 224,
        },
        "text_cfg": {
            "hf_model_name": str(folder),
            "hf_tokenizer_name": str(folder),
            "hf_model_pretrained": False,
            "hf_proj_type": "mlp",
            "hf_pooler_type": "cls_last_hidden_state_pooler",
            "context_length": sizes["context"],
        },
    }
    config = {
        "model_cfg": model_cfg,
        "preprocess_cfg": {
            "mean": [0.48145466, 0.4578275, 0.40821073],
            "std": [0.26862954, 0.26130258, 0.27577711],
        },
    }
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(seed)
    model = open_clip.CustomTextCLIP(**model_cfg)  # open_clip's own BiomedCLIP class
    _perturb(model, seed)
    with torch.no_grad():
        model.logit_scale.fill_(3.2)  # exp = 24.5: probabilities neither flat nor one-hot
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder


def open_clip_reference(folder: Path):
    """(model, tokenizer) loaded back by open_clip from the folder, as a user of it would."""
    importable_torchvision()
    import open_clip

    model = open_clip.create_model(f"local-dir:{folder}").eval()
    return model, open_clip.get_tokenizer(f"local-dir:{folder}")


def sam_model(image_size: int, grid: int, seed: int = 0):
    """A small segment-anything `Sam` (its own classes), random weights."""
    importable_torchvision()
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    torch.manual_seed(seed)
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=image_size,
            patch_size=image_size // grid,
            embed_dim=32,
            depth=1,
            num_heads=2,
            out_chans=SAM_DIM,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=SAM_DIM,
            image_embedding_size=(grid, grid),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2, embedding_dim=SAM_DIM, mlp_dim=64, num_heads=SAM_HEADS
            ),
            transformer_dim=SAM_DIM,
            iou_head_depth=3,
            iou_head_hidden_dim=24,
        ),
    ).eval()
    _perturb(sam, seed)
    return sam


def sam_file(path: Path, image_size: int, grid: int, seed: int = 0) -> Path:
    """`sam_model(...)` saved as SAM's checkpoints are: the `Sam` state dict in a .pth."""
    torch.save(sam_model(image_size, grid, seed).state_dict(), path)
    return path


# open_clip's (and BiomedCLIP's) normalisation, written out so a test states what it compares
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
