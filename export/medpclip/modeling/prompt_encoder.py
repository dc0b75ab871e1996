"""SAM-style prompt encoder plus a soft region map on the patch grid.

Points and box corners are Fourier-encoded with a learned embedding per label (sparse tokens);
a mask goes through a small strided conv stack (dense map). Unlike SAM, every prompt also becomes
a soft per-patch region weight, which the image encoder uses to integrate the region at feature
level (dense map through gates, region map as an attention bias). No prompt = the whole image.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from .common import FourierPositions, LayerNorm2d

# point labels, as in SAM
PAD, BACKGROUND, FOREGROUND, BOX_TOP_LEFT, BOX_BOTTOM_RIGHT = -1, 0, 1, 2, 3


class PromptEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        dim, mc = cfg.prompt.dim, cfg.prompt.mask_channels
        self.image_size = cfg.vision.image_size
        self.patch = cfg.vision.patch_size
        self.grid = cfg.vision.grid
        self.sigma = cfg.prompt.point_sigma * self.patch
        self.pe = FourierPositions(dim)
        self.point_embeddings = nn.Parameter(torch.randn(4, dim) * 0.02)  # bg, fg, tl, br
        self.not_a_point = nn.Parameter(torch.randn(dim) * 0.02)
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mc // 4, kernel_size=2, stride=2),
            LayerNorm2d(mc // 4),
            nn.GELU(),
            nn.Conv2d(mc // 4, mc, kernel_size=2, stride=2),
            LayerNorm2d(mc),
            nn.GELU(),
            nn.Conv2d(mc, dim, kernel_size=1),
        )
        self.no_mask = nn.Parameter(torch.randn(dim) * 0.02)
        self.region_inside = nn.Parameter(torch.randn(dim) * 0.02)
        self.region_outside = nn.Parameter(torch.randn(dim) * 0.02)
        centres = (torch.arange(self.grid, dtype=torch.float32) + 0.5) * self.patch
        ys, xs = torch.meshgrid(centres, centres, indexing="ij")
        self.register_buffer("patch_centres", torch.stack([xs, ys], -1).reshape(-1, 2), False)

    def forward(
        self, point_coords: Tensor, point_labels: Tensor, mask_input: Tensor, has_mask: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """
        point_coords [B,N,2] (x, y in model-input pixels), point_labels [B,N] int,
        mask_input [B,1,M,M] in [0, 1], has_mask [B,1]
        -> sparse [B,N,C], dense [B,C,g,g], region_map [B,g*g] in [0, 1].
        """
        labels = point_labels.long()
        sparse = self._sparse(point_coords, labels)
        region = self._region(point_coords, labels, mask_input, has_mask)
        b = point_coords.shape[0]
        hm = has_mask.reshape(b, 1, 1, 1)
        dense = (
            hm * self.mask_downscaling(mask_input) + (1 - hm) * self.no_mask[None, :, None, None]
        )
        r = region.reshape(b, 1, self.grid, self.grid)
        dense = dense + r * self.region_inside[None, :, None, None]
        dense = dense + (1 - r) * self.region_outside[None, :, None, None]
        return sparse, dense, region

    def _sparse(self, coords: Tensor, labels: Tensor) -> Tensor:
        pe = self.pe.encode((coords + 0.5) / self.image_size)
        label_emb = self.point_embeddings[labels.clamp(min=0)]
        is_pad = (labels == PAD).unsqueeze(-1)
        return torch.where(is_pad, self.not_a_point.expand_as(pe), pe + label_emb)

    def _region(
        self, coords: Tensor, labels: Tensor, mask_input: Tensor, has_mask: Tensor
    ) -> Tensor:
        # distance of every patch centre to every point: [B,P,N]
        d2 = (self.patch_centres[None, :, None, :] - coords[:, None, :, :]).pow(2).sum(-1)
        bump = torch.exp(-d2 / (2 * self.sigma**2))
        zero = torch.zeros_like(bump)
        fg = torch.where((labels == FOREGROUND)[:, None, :], bump, zero).amax(-1)
        bg = torch.where((labels == BACKGROUND)[:, None, :], bump, zero).amax(-1)

        is_tl, is_br = labels == BOX_TOP_LEFT, labels == BOX_BOTTOM_RIGHT
        has_box = is_tl.any(-1, keepdim=True).to(coords.dtype)  # [B,1]
        tl = torch.where(is_tl[..., None], coords, torch.zeros_like(coords)).sum(1)  # [B,2]
        br = torch.where(is_br[..., None], coords, torch.zeros_like(coords)).sum(1)
        t = self.patch / 8  # softness of the box edge, in pixels
        c = self.patch_centres[None]  # [1,P,2]
        inside = torch.sigmoid((c - tl[:, None]) / t) * torch.sigmoid((br[:, None] - c) / t)
        box = inside.prod(-1) * has_box

        hm = has_mask.reshape(-1, 1)
        m = nn.functional.avg_pool2d(mask_input, kernel_size=4).flatten(1) * hm

        positive = torch.maximum(torch.maximum(fg, box), m)
        has_fg = (labels == FOREGROUND).any(-1, keepdim=True).to(coords.dtype)
        has_positive = (has_fg + has_box + hm) > 0
        region = torch.where(has_positive, positive, torch.ones_like(positive))
        return region * (1 - bg)
