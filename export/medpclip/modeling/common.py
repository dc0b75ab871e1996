"""Building blocks shared by the towers: attention, MLP, channel LayerNorm, Fourier positions."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

# Additive bias that removes a key from a softmax: exp(-1e4) underflows to exactly 0 in fp32 and
# fp16, while staying finite (no NaN from -inf - -inf in fully masked rows).
MASKED = -1.0e4


class Attention(nn.Module):
    """Multi-head attention on `scaled_dot_product_attention`: one fused kernel in PyTorch (flash
    or memory-efficient attention on a GPU), and plain MatMul/Softmax/MatMul nodes in the ONNX
    graph (the TorchScript exporter decomposes it), so ONNX Runtime and TensorRT see no custom
    op."""

    def __init__(
        self, dim: int, heads: int, kv_dim: int | None = None, inner_dim: int | None = None
    ) -> None:
        """`inner_dim` (default `dim`): the width q, k and v are projected to (SAM's decoder
        cross-attends at half width)."""
        super().__init__()
        kv_dim = kv_dim or dim
        inner = inner_dim or dim
        self.heads = heads
        self.q = nn.Linear(dim, inner)
        self.k = nn.Linear(kv_dim, inner)
        self.v = nn.Linear(kv_dim, inner)
        self.out = nn.Linear(inner, dim)
        self.scale = 1.0 / math.sqrt(inner // heads)

    def _split(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)

    def _attend(self, qh: Tensor, kh: Tensor, vh: Tensor, bias: Tensor | None = None) -> Tensor:
        """[B,H,Nq,d] x [B,H,Nk,d] -> [B,Nq,H,d]: softmax(q k^T * scale + bias) v."""
        x = nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias, scale=self.scale)
        return x.transpose(1, 2)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None) -> Tensor:
        """q [B,Nq,dim], k/v [B,Nk,kv_dim], bias broadcastable to [B,heads,Nq,Nk] -> [B,Nq,dim]."""
        qh, kh, vh = self._split(self.q(q)), self._split(self.k(k)), self._split(self.v(v))
        x = self._attend(qh, kh, vh, bias)
        return self.out(x.reshape(x.shape[0], x.shape[1], -1))

    def with_reader(self, x: Tensor, reader_bias: Tensor) -> Tensor:
        """Self-attention of x [B,n+1,dim] whose last token is a pure reader -> [B,n+1,dim].

        The first n tokens attend among themselves with no bias and never see the reader: plain
        attention. The reader is one query over those n keys (not itself), with reader_bias
        [B,n] added to its scores in every head. This is `forward(x, x, x, bias)` with the dense
        [B,1,n+1,n+1] bias that is 0 in the top-left n x n block, MASKED in the last column and
        (reader_bias, MASKED) in the last row, without building or adding that bias for the n
        rows that do not need it.
        """
        n = x.shape[1] - 1
        qh, kh, vh = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        kh, vh = kh[:, :, :n], vh[:, :, :n]  # nobody attends to the reader
        tokens = self._attend(qh[:, :, :n], kh, vh)  # [B,n,H,d]
        reader = self._attend(qh[:, :, n:], kh, vh, reader_bias[:, None, None, :])  # [B,1,H,d]
        x = torch.cat([tokens, reader], dim=1)
        return self.out(x.reshape(x.shape[0], x.shape[1], -1))


ACTIVATIONS = {"gelu": nn.functional.gelu, "relu": nn.functional.relu}


class MLP(nn.Module):
    def __init__(
        self,
        dim: int,
        hidden: int,
        out: int | None = None,
        layers: int = 2,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        dims = [dim] + [hidden] * (layers - 1) + [out or dim]
        self.layers = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True)
        )
        self.act = ACTIVATIONS[activation]

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = self.act(x)
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
        g = self.gaussian
        centres = (torch.arange(side, dtype=g.dtype, device=g.device) + 0.5) / side
        ys, xs = torch.meshgrid(centres, centres, indexing="ij")
        return self.encode(torch.stack([xs, ys], dim=-1)).permute(2, 0, 1)
