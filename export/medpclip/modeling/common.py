"""Building blocks shared by the towers: attention, MLP, channel LayerNorm, Fourier positions."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

# Additive bias that removes a key from a softmax: exp(-1e4) underflows to exactly 0 in fp32 and
# fp16, while staying finite (no NaN from -inf - -inf in fully masked rows).
MASKED = -1.0e4


class Attention(nn.Module):
    """Multi-head attention written out (matmul + softmax) so ONNX/TensorRT see plain ops."""

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None) -> None:
        super().__init__()
        kv_dim = kv_dim or dim
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(kv_dim, dim)
        self.v = nn.Linear(kv_dim, dim)
        self.out = nn.Linear(dim, dim)
        self.scale = 1.0 / math.sqrt(dim // heads)

    def _split(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None) -> Tensor:
        """q [B,Nq,dim], k/v [B,Nk,kv_dim], bias broadcastable to [B,heads,Nq,Nk] -> [B,Nq,dim]."""
        qh, kh, vh = self._split(self.q(q)), self._split(self.k(k)), self._split(self.v(v))
        scores = (qh @ kh.transpose(-2, -1)) * self.scale
        if bias is not None:
            scores = scores + bias
        x = scores.softmax(dim=-1) @ vh
        b, _, n, _ = x.shape
        return self.out(x.transpose(1, 2).reshape(b, n, -1))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int | None = None, layers: int = 2) -> None:
        super().__init__()
        dims = [dim] + [hidden] * (layers - 1) + [out or dim]
        self.layers = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True)
        )

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = nn.functional.gelu(x)
        return x


class LayerNorm2d(nn.Module):
    """LayerNorm over channels of a [B,C,H,W] map (as in SAM)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class FourierPositions(nn.Module):
    """Random Fourier features of normalised (x, y) coordinates (SAM's PositionEmbeddingRandom)."""

    def __init__(self, dim: int, scale: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("gaussian", scale * torch.randn(2, dim // 2))

    def encode(self, xy01: Tensor) -> Tensor:
        """xy01 [..., 2] in [0, 1] -> [..., dim]."""
        proj = (2 * xy01 - 1) @ self.gaussian * (2 * math.pi)
        return torch.cat([proj.sin(), proj.cos()], dim=-1)

    def grid(self, side: int) -> Tensor:
        """Encoding of a side x side grid of cell centres -> [dim, side, side]."""
        centres = (
            torch.arange(side, dtype=torch.float32, device=self.gaussian.device) + 0.5
        ) / side
        ys, xs = torch.meshgrid(centres, centres, indexing="ij")
        return self.encode(torch.stack([xs, ys], dim=-1)).permute(2, 0, 1)
