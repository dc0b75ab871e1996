"""ViT image encoder with feature-level region prompt integration.

The first `depth - prompt_blocks` blocks (the trunk) never see the prompt: they can be computed
once per image and reused for many prompts (`forward_trunk`). The last `prompt_blocks` blocks
(`forward_prompted`) integrate the region:

* the dense prompt map is added to the patch tokens through a per-block gate that starts at
  zero, so a CLIP checkpoint loaded into a fresh model behaves exactly as before;
* a region token (initialised from the CLS state) attends to CLS and the patches with an
  additive bias that favours patches inside the region but never masks the rest out (global
  context stays); CLS and patch tokens do not attend to the region token, so the global path is
  prompt-free until the gates open.

Since nobody attends to the region token and it does not attend to itself, it is a pure reader:
only its one attention row carries a bias (`Attention.with_reader`: a one-query attention over
CLS and the patches), while CLS and the patches run plain attention, as in the trunk blocks.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from .common import MLP, Attention


class Block(nn.Module):
    """Pre-LN transformer block (CLIP ViT)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, bias)
        return x + self.mlp(self.norm2(x))

    def forward_with_reader(self, x: Tensor, reader_bias: Tensor) -> Tensor:
        """x [B,n+1,W] whose last token only reads the others (`Attention.with_reader`),
        reader_bias [B,n] -> [B,n+1,W]."""
        x = x + self.attn.with_reader(self.norm1(x), reader_bias)
        return x + self.mlp(self.norm2(x))


class ImageEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        v = cfg.vision
        self.grid = v.grid
        self.trunk_depth = v.depth - v.prompt_blocks
        self.patch_embed = nn.Conv2d(3, v.width, kernel_size=v.patch_size, stride=v.patch_size)
        self.cls_token = nn.Parameter(torch.randn(v.width) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1 + v.grid**2, v.width) * 0.02)
        # timm's ViT (BiomedCLIP) has no LayerNorm before the blocks: Identity, no weights
        self.ln_pre = nn.LayerNorm(v.width, eps=v.ln_eps) if v.pre_norm else nn.Identity()
        self.blocks = nn.ModuleList(
            Block(v.width, v.heads, v.mlp_ratio, v.ln_eps) for _ in range(v.depth)
        )
        self.ln_post = nn.LayerNorm(v.width, eps=v.ln_eps)
        self.proj = nn.Linear(v.width, cfg.embed_dim, bias=False)
        # region integration, one gate and projection per prompted block
        self.dense_proj = nn.ModuleList(
            nn.Linear(cfg.prompt.dim, v.width) for _ in range(v.prompt_blocks)
        )
        self.gates = nn.Parameter(torch.zeros(v.prompt_blocks))
        self.region_token = nn.Parameter(torch.zeros(v.width))
        self.region_bias = nn.Parameter(torch.tensor(float(v.region_bias_init)))

    def forward_trunk(self, pixel_values: Tensor) -> Tensor:
        """pixel_values [B,3,S,S] -> prompt-independent tokens [B,1+P,W]."""
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.pos_embed)
        for block in self.blocks[: self.trunk_depth]:
            x = block(x)
        return x

    def forward_prompted(
        self, tokens: Tensor, dense: Tensor, region_map: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """tokens [B,1+P,W], dense [B,C,g,g], region_map [B,P]
        -> global [B,D], region [B,D] (both L2-normalised), patch features [B,P,W]."""
        b, n, _ = tokens.shape  # n = 1 + P
        dense_tokens = dense.flatten(2).transpose(1, 2)  # [B,P,C]
        reg = tokens[:, :1] + self.region_token
        x = torch.cat([tokens, reg], dim=1)  # [CLS, patches, REG]
        reader_bias = self._reader_bias(region_map)
        for i, block in enumerate(self.blocks[self.trunk_depth :]):
            gated = self.gates[i] * self.dense_proj[i](dense_tokens)
            x = torch.cat([x[:, :1], x[:, 1:n] + gated, x[:, n:]], dim=1)
            x = block.forward_with_reader(x, reader_bias)
        x = self.ln_post(x)
        global_emb = nn.functional.normalize(self.proj(x[:, 0]), dim=-1)
        region_emb = nn.functional.normalize(self.proj(x[:, n]), dim=-1)
        return global_emb, region_emb, x[:, 1:n]

    def _reader_bias(self, region_map: Tensor) -> Tensor:
        """region_map [B,P] -> the region token's bias over [CLS, patches], [B,1+P]: 0 for CLS
        and inside the region, -region_bias outside, never -inf. (REG does not attend to itself,
        so with no prompt, region map all ones, it reads exactly what CLS reads.)"""
        towards = self.region_bias * (region_map - 1)
        return torch.cat([torch.zeros_like(towards[:, :1]), towards], dim=1)

    def forward(
        self, pixel_values: Tensor, dense: Tensor, region_map: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        return self.forward_prompted(self.forward_trunk(pixel_values), dense, region_map)
