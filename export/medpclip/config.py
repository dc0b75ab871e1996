"""Model sizes as data: `configs/<name>.json` -> a typed `ModelConfig`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from medpclip_core.tensors import Dims

# model sizes as data: medpclip/configs/<size>.json (package data)
CONFIG_DIR = Path(str(resources.files("medpclip") / "configs"))
# The embedded default model (tiny, trained on phantoms; see its README), package data.
DEFAULT_CHECKPOINT = Path(str(resources.files("medpclip") / "default_model"))


@dataclass(frozen=True)
class VisionConfig:
    image_size: int
    patch_size: int
    width: int
    depth: int
    heads: int
    mlp_ratio: float
    prompt_blocks: int  # region prompt enters only the last `prompt_blocks` blocks
    region_bias_init: float
    # Where checkpoints of other families differ (timm's ViT, BiomedCLIP's tower): a LayerNorm
    # before the blocks (OpenAI CLIP's `ln_pre`; timm's ViT-B has none) and the LayerNorm epsilon
    # (timm: 1e-6). The defaults are the layout our own checkpoints were trained with.
    pre_norm: bool = True
    ln_eps: float = 1e-5

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class PromptConfig:
    dim: int
    mask_channels: int
    point_sigma: float  # in patches: how far a point's region weight reaches


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    context_length: int
    width: int
    layers: int
    heads: int
    mlp_ratio: float
    # projection to the shared space: one linear map, or open_clip's "mlp" (linear, GELU,
    # linear, no biases; hidden width `proj_hidden`), as BiomedCLIP's text tower has
    proj: str = "linear"
    proj_hidden: int = 0

    def __post_init__(self) -> None:
        if self.proj not in ("linear", "mlp"):
            raise ValueError(f"text proj must be 'linear' or 'mlp', got {self.proj!r}")
        if self.proj == "mlp" and self.proj_hidden < 1:
            raise ValueError("text proj 'mlp' needs proj_hidden >= 1")


@dataclass(frozen=True)
class DecoderConfig:
    depth: int
    heads: int
    mlp_dim: int
    upscale_channels: int
    iou_hidden: int
    # SAM's decoder, so that its weights import as they are: ReLU in the two-way MLPs and the
    # output heads, cross-attention at 1/`attention_downsample` width, and `mask_tokens` output
    # tokens taking part in attention (SAM: 4, its multimask outputs) of which the first is
    # served. Defaults: the layout our own checkpoints were trained with.
    activation: str = "gelu"
    attention_downsample: int = 1
    mask_tokens: int = 1

    def __post_init__(self) -> None:
        if self.activation not in ("gelu", "relu"):
            raise ValueError(f"decoder activation must be gelu or relu, got {self.activation!r}")
        if self.attention_downsample < 1 or self.mask_tokens < 1:
            raise ValueError("decoder attention_downsample and mask_tokens must be >= 1")


@dataclass(frozen=True)
class ModelConfig:
    name: str
    embed_dim: int
    logit_scale_init: float
    vision: VisionConfig
    prompt: PromptConfig
    text: TextConfig
    decoder: DecoderConfig

    def __post_init__(self) -> None:
        v = self.vision
        if v.image_size % v.patch_size:
            raise ValueError(f"image_size {v.image_size} is not a multiple of patch {v.patch_size}")
        if not 0 < v.prompt_blocks <= v.depth:
            raise ValueError(
                f"prompt_blocks must be in 1..depth ({v.depth}), got {v.prompt_blocks}"
            )
        for part, width, heads in (
            ("vision", v.width, v.heads),
            ("text", self.text.width, self.text.heads),
            ("decoder", self.prompt.dim, self.decoder.heads),
            (
                "decoder cross-attention",
                self.prompt.dim // self.decoder.attention_downsample,
                self.decoder.heads,
            ),
        ):
            if width % heads:
                raise ValueError(f"{part} width {width} is not divisible by heads {heads}")

    @property
    def dims(self) -> Dims:
        return Dims(
            S=self.vision.image_size,
            g=self.vision.grid,
            W=self.vision.width,
            C=self.prompt.dim,
            D=self.embed_dim,
            L=self.text.context_length,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        return cls(
            name=d["name"],
            embed_dim=d["embed_dim"],
            logit_scale_init=d["logit_scale_init"],
            vision=VisionConfig(**d["vision"]),
            prompt=PromptConfig(**d["prompt"]),
            text=TextConfig(**d["text"]),
            decoder=DecoderConfig(**d["decoder"]),
        )

    @classmethod
    def load(cls, name_or_path: str | Path) -> ModelConfig:
        """A bundled size (`tiny`, `base`) or a path to a config JSON."""
        path = Path(name_or_path)
        if not path.suffix:
            path = CONFIG_DIR / f"{name_or_path}.json"
        if not path.is_file():
            sizes = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
            raise FileNotFoundError(f"no model config {name_or_path!r} (bundled sizes: {sizes})")
        return cls.from_dict(json.loads(path.read_text()))


def available_sizes() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
