"""MedP-CLIP assembled from its components, and its checkpoints (safetensors + config)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch import Tensor, nn

from .config import ModelConfig
from .modeling import ImageEncoder, MaskDecoder, PromptEncoder, TextEncoder

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"


class MedPClip(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.prompt_encoder = PromptEncoder(cfg)
        self.image_encoder = ImageEncoder(cfg)
        self.text_encoder = TextEncoder(cfg)
        self.mask_decoder = MaskDecoder(cfg)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(cfg.logit_scale_init)))

    def forward(
        self,
        pixel_values: Tensor,
        point_coords: Tensor,
        point_labels: Tensor,
        mask_input: Tensor,
        has_mask: Tensor,
    ) -> dict[str, Tensor]:
        """The image path for one batch; tensor names as in `medpclip_core.tensors`. Float
        inputs are taken in the model's dtype (a `model.half()` accepts float32 inputs)."""
        dtype = self.logit_scale.dtype
        pixel_values, point_coords, mask_input, has_mask = (
            t.to(dtype) for t in (pixel_values, point_coords, mask_input, has_mask)
        )
        sparse, dense, region = self.prompt_encoder(
            point_coords, point_labels, mask_input, has_mask
        )
        global_emb, region_emb, patches = self.image_encoder(pixel_values, dense, region)
        masks, iou = self.mask_decoder(patches, sparse, dense)
        return {
            "sparse_embeddings": sparse,
            "dense_embeddings": dense,
            "region_map": region,
            "global_embedding": global_emb,
            "region_embedding": region_emb,
            "patch_features": patches,
            "mask_logits": masks,
            "iou": iou,
        }

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.text_encoder(input_ids, attention_mask)


def build(cfg: ModelConfig, seed: int = 0) -> MedPClip:
    """A freshly initialised model; the same seed gives the same weights."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return MedPClip(cfg).eval()


def save_checkpoint(model: MedPClip, directory: Path, tokenizer_json: Path | Tokenizer) -> Path:
    """Weights, config and tokenizer in `directory`. The tokenizer is written without padding
    or truncation (`tokenizer.save_tokenizer`): the text context length a checkpoint carries is
    its config's `text.context_length` only, whatever the source JSON said."""
    from .tokenizer import save_tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(directory / WEIGHTS), metadata={"format": "medpclip-v1"})
    (directory / CONFIG).write_text(json.dumps(model.cfg.to_dict(), indent=2) + "\n")
    tok = tokenizer_json
    if not isinstance(tok, Tokenizer):
        tok = Tokenizer.from_file(str(tokenizer_json))
    save_tokenizer(tok, directory / TOKENIZER)
    return directory


class CheckpointMismatch(ValueError):
    pass


def load_checkpoint(directory: str | Path) -> MedPClip:
    """Load `directory/{config.json,model.safetensors}`; fail naming the first mismatches."""
    directory = Path(directory)
    for name in (CONFIG, WEIGHTS):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"checkpoint {directory} has no {name}")
    cfg = ModelConfig.from_dict(json.loads((directory / CONFIG).read_text()))
    model = MedPClip(cfg).eval()
    state = load_file(str(directory / WEIGHTS))
    expected = model.state_dict()
    problems = [f"missing {k} {tuple(v.shape)}" for k, v in expected.items() if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [
        f"shape of {k}: checkpoint {tuple(state[k].shape)}, config wants {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if problems:
        shown = "; ".join(problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CheckpointMismatch(
            f"checkpoint {directory} does not match its config '{cfg.name}': {shown}{more}"
        )
    model.load_state_dict(state)
    return model
