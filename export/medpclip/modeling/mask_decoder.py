"""SAM-style mask decoder: a two-way transformer between prompt tokens and patch features.

The layout is SAM's (`segment_anything.modeling.mask_decoder`), so SAM ViT-B's decoder imports
as it is (`medpclip.convert.sam`): its ReLU, half-width cross-attention and four mask tokens are
config options (`DecoderConfig`). Only the first mask token's output is served (SAM's
single-mask output); the others still take part in attention, which is why they are kept."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from .common import MLP, Attention, FourierPositions, LayerNorm2d


class TwoWayBlock(nn.Module):
    """Tokens self-attend, tokens read the image, tokens MLP, the image reads the tokens."""

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_dim: int,
        skip_first_pe: bool,
        activation: str = "gelu",
        cross_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.skip_first_pe = skip_first_pe
        self.self_attn = Attention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.token_to_image = Attention(dim, heads, inner_dim=cross_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_dim, activation=activation)
        self.norm3 = nn.LayerNorm(dim)
        self.image_to_token = Attention(dim, heads, inner_dim=cross_dim)
        self.norm4 = nn.LayerNorm(dim)

    def forward(self, tokens: Tensor, image: Tensor, token_pe: Tensor, image_pe: Tensor):
        if self.skip_first_pe:
            tokens = self.self_attn(tokens, tokens, tokens)
        else:
            q = tokens + token_pe
            tokens = tokens + self.self_attn(q, q, tokens)
        tokens = self.norm1(tokens)
        q, k = tokens + token_pe, image + image_pe
        tokens = self.norm2(tokens + self.token_to_image(q, k, image))
        tokens = self.norm3(tokens + self.mlp(tokens))
        q, k = tokens + token_pe, image + image_pe
        image = self.norm4(image + self.image_to_token(k, q, tokens))
        return tokens, image


class MaskDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        dim, d = cfg.prompt.dim, cfg.decoder
        up = d.upscale_channels
        self.grid = cfg.vision.grid
        self.neck = nn.Sequential(nn.Linear(cfg.vision.width, dim), nn.LayerNorm(dim))
        self.pe = FourierPositions(dim)
        self.iou_token = nn.Parameter(torch.randn(dim) * 0.02)
        self.mask_token = nn.Parameter(torch.randn(dim) * 0.02)
        if d.mask_tokens > 1:  # SAM's multimask tokens: in attention, their outputs unused
            self.extra_mask_tokens = nn.Parameter(torch.randn(d.mask_tokens - 1, dim) * 0.02)
        cross = dim // d.attention_downsample
        self.blocks = nn.ModuleList(
            TwoWayBlock(dim, d.heads, d.mlp_dim, i == 0, d.activation, cross)
            for i in range(d.depth)
        )
        self.final_attn = Attention(dim, d.heads, inner_dim=cross)
        self.final_norm = nn.LayerNorm(dim)
        self.upscale = nn.Sequential(
            nn.ConvTranspose2d(dim, up, kernel_size=2, stride=2),
            LayerNorm2d(up),
            nn.GELU(),
            nn.ConvTranspose2d(up, up // 2, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.hypernet = MLP(dim, dim, up // 2, layers=3, activation=d.activation)
        self.iou_head = MLP(dim, d.iou_hidden, 1, layers=3, activation=d.activation)

    def forward(
        self, patch_features: Tensor, sparse: Tensor, dense: Tensor
    ) -> tuple[Tensor, Tensor]:
        """patch_features [B,P,W], sparse [B,N,C], dense [B,C,g,g]
        -> mask logits [B,4g,4g], iou [B,1]."""
        return self.decode(self.neck(patch_features), sparse, dense)

    def decode(self, embedding: Tensor, sparse: Tensor, dense: Tensor) -> tuple[Tensor, Tensor]:
        """The decoder after its neck: image embedding [B,P,C] (SAM's image-encoder output,
        flattened), sparse [B,N,C], dense [B,C,g,g] -> mask logits [B,4g,4g], iou [B,1]."""
        b, c = dense.shape[0], dense.shape[1]
        image = embedding + dense.flatten(2).transpose(1, 2)  # [B,P,C]
        image_pe = self.pe.grid(self.grid).flatten(1).transpose(0, 1)[None]  # [1,P,C]
        out = [self.iou_token[None], self.mask_token[None]]
        if hasattr(self, "extra_mask_tokens"):
            out.append(self.extra_mask_tokens)
        out_tokens = torch.cat(out)[None].expand(b, -1, -1)
        tokens = torch.cat([out_tokens, sparse], dim=1)
        token_pe = tokens
        x = tokens
        for block in self.blocks:
            x, image = block(x, image, token_pe, image_pe)
        q, k = x + token_pe, image + image_pe
        x = self.final_norm(x + self.final_attn(q, k, image))
        upscaled = self.upscale(image.transpose(1, 2).reshape(b, c, self.grid, self.grid))
        weights = self.hypernet(x[:, 1])  # [B,up/2]
        masks = (weights[:, None, :] @ upscaled.flatten(2)).reshape(b, 4 * self.grid, 4 * self.grid)
        return masks, self.iou_head(x[:, 0])
