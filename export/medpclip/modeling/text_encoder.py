"""BERT-style text tower (post-LN encoder, CLS pooling) projected to the shared space.

BERT also adds a token-type embedding; every label is one segment (type 0), so an importer
folds that row into `position_embedding` instead of keeping a parameter that is constant."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from .common import MASKED, MLP, Attention


class BertLayer(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.attn = Attention(dim, heads)
        self.norm1 = nn.LayerNorm(dim, eps=1e-12)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.norm2 = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        x = self.norm1(x + self.attn(x, x, x, bias))
        return self.norm2(x + self.mlp(x))


class TextEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        t = cfg.text
        self.token_embedding = nn.Embedding(t.vocab_size, t.width)
        self.position_embedding = nn.Parameter(torch.randn(t.context_length, t.width) * 0.02)
        self.norm = nn.LayerNorm(t.width, eps=1e-12)
        self.layers = nn.ModuleList(
            BertLayer(t.width, t.heads, t.mlp_ratio) for _ in range(t.layers)
        )
        if t.proj == "mlp":  # open_clip's hf_proj_type "mlp" (BiomedCLIP), same layout
            self.proj: nn.Module = nn.Sequential(
                nn.Linear(t.width, t.proj_hidden, bias=False),
                nn.GELU(),
                nn.Linear(t.proj_hidden, cfg.embed_dim, bias=False),
            )
        else:
            self.proj = nn.Linear(t.width, cfg.embed_dim, bias=False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids, attention_mask [B,L] int -> L2-normalised embedding [B,D]."""
        x = self.token_embedding(input_ids) + self.position_embedding[: input_ids.shape[1]]
        x = self.norm(x)
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * MASKED
        for layer in self.layers:
            x = layer(x, bias)
        return nn.functional.normalize(self.proj(x[:, 0]), dim=-1)
