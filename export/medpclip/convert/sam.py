"""SAM's prompt encoder and mask decoder (a `sam_vit_*.pth` file) -> MedP-CLIP's.

Where the shapes match and why:
- prompt encoder: identical layout (random Fourier point encoding, four point-type embeddings,
  a "not a point" and a "no mask" embedding, the strided mask conv stack). SAM normalises point
  coordinates by its input size (1024) and ours by ours (224 for BiomedCLIP), so points mean the
  same relative place. Our additions, `region_inside`/`region_outside` (the soft region map
  added to the dense prompt), start at zero: the dense map is SAM's until fine-tuning.
- mask decoder: identical two-way transformer, upscaling and heads with the config options
  SAM needs (ReLU, half-width cross-attention, four mask tokens of which the first, SAM's
  single-mask output, is served). Dropped: the hypernetworks and IoU rows of the three
  multimask outputs (never served). Not from SAM: `neck`, which maps our CLIP ViT's patch
  features to the decoder's width (SAM's neck belongs to SAM's own image encoder), and the
  positional encoding of the image grid, which is SAM's Fourier matrix evaluated on our grid.
- SAM's image encoder (ViT-B/L/H at 1024 px, windowed attention) is not used: MedP-CLIP's
  image tower is the CLIP's. Until `neck` is trained, masks from an imported decoder are not
  meaningful; region fine-tuning (`medpclip_tools.finetune`) trains it.
- The decoder's attention heads are not visible in weight shapes; every SAM size uses 8.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from ..config import DecoderConfig, ModelConfig, PromptConfig
from ..model import MedPClip, build
from .state import ConversionError, Importer, Report, load_state_dict

PE, MD = "prompt_encoder.", "mask_decoder."
SAM_DECODER_HEADS = 8


def sam_configs(
    state: dict[str, Tensor], base: ModelConfig, heads: int = SAM_DECODER_HEADS
) -> tuple[PromptConfig, DecoderConfig]:
    """Our prompt and decoder configs with SAM's sizes (from its weight shapes)."""
    try:
        dim = int(state[PE + "no_mask_embed.weight"].shape[1])
        mask_channels = int(state[PE + "mask_downscaling.3.weight"].shape[0])
        layer = MD + "transformer.layers.0."
        cross = int(state[layer + "cross_attn_token_to_image.q_proj.weight"].shape[0])
        decoder = DecoderConfig(
            depth=len({k.split(".")[3] for k in state if k.startswith(MD + "transformer.layers.")}),
            heads=heads,
            mlp_dim=int(state[layer + "mlp.lin1.weight"].shape[0]),
            upscale_channels=int(state[MD + "output_upscaling.0.weight"].shape[1]),
            iou_hidden=int(state[MD + "iou_prediction_head.layers.0.weight"].shape[0]),
            activation="relu",
            attention_downsample=dim // cross,
            mask_tokens=int(state[MD + "mask_tokens.weight"].shape[0]),
        )
    except KeyError as exc:
        raise ConversionError(
            f"not a SAM checkpoint (no {exc.args[0]}): expected segment-anything's "
            "sam_vit_b/l/h .pth with prompt_encoder.* and mask_decoder.*"
        ) from None
    for mlp in ("iou_prediction_head", "output_hypernetworks_mlps.0"):
        n = len({k for k in state if re.match(re.escape(MD + mlp) + r"\.layers\.\d+\.weight", k)})
        if n != 3:
            raise ConversionError(f"SAM {mlp} has {n} layers; the importer knows SAM's 3")
    if dim % cross:
        raise ConversionError(f"SAM cross-attention width {cross} does not divide {dim}")
    prompt = replace(base.prompt, dim=dim, mask_channels=mask_channels)
    return prompt, decoder


def map_sam(imp: Importer, cfg: ModelConfig) -> None:
    gaussian = PE + "pe_layer.positional_encoding_gaussian_matrix"
    imp.copy("prompt_encoder.pe.gaussian", gaussian)
    imp.put("mask_decoder.pe.gaussian", imp.take(gaussian), gaussian)
    points = torch.cat([imp.take(PE + f"point_embeddings.{i}.weight") for i in range(4)])
    imp.put("prompt_encoder.point_embeddings", points, PE + "point_embeddings.{0..3}")
    imp.put(
        "prompt_encoder.not_a_point",
        imp.take(PE + "not_a_point_embed.weight")[0],
        PE + "not_a_point_embed.weight",
    )
    imp.put(
        "prompt_encoder.no_mask",
        imp.take(PE + "no_mask_embed.weight")[0],
        PE + "no_mask_embed.weight",
    )
    for i in (0, 1, 3, 4, 6):  # conv, LayerNorm2d, conv, LayerNorm2d, conv (GELUs between)
        for part in ("weight", "bias"):
            imp.copy(
                f"prompt_encoder.mask_downscaling.{i}.{part}", PE + f"mask_downscaling.{i}.{part}"
            )

    imp.put("mask_decoder.iou_token", imp.take(MD + "iou_token.weight")[0], MD + "iou_token.weight")
    tokens = imp.take(MD + "mask_tokens.weight")
    imp.put("mask_decoder.mask_token", tokens[0], MD + "mask_tokens.weight[0]")
    if len(tokens) > 1:
        imp.put("mask_decoder.extra_mask_tokens", tokens[1:], MD + "mask_tokens.weight[1:]")
    attn = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "out_proj"}
    for i in range(cfg.decoder.depth):
        s, o = f"{MD}transformer.layers.{i}.", f"mask_decoder.blocks.{i}."
        pairs = [(f"norm{n}", f"norm{n}") for n in range(1, 5)]
        pairs += [("mlp.layers.0", "mlp.lin1"), ("mlp.layers.1", "mlp.lin2")]
        for ours, theirs in (
            ("self_attn", "self_attn"),
            ("token_to_image", "cross_attn_token_to_image"),
            ("image_to_token", "cross_attn_image_to_token"),
        ):
            pairs += [(f"{ours}.{a}", f"{theirs}.{b}") for a, b in attn.items()]
        for ours, theirs in pairs:
            for part in ("weight", "bias"):
                imp.copy(o + f"{ours}.{part}", s + f"{theirs}.{part}")
    t = MD + "transformer."
    for part in ("weight", "bias"):
        for a, b in attn.items():
            imp.copy(
                f"mask_decoder.final_attn.{a}.{part}", t + f"final_attn_token_to_image.{b}.{part}"
            )
        imp.copy(f"mask_decoder.final_norm.{part}", t + f"norm_final_attn.{part}")
        for i in (0, 1, 3):  # transposed conv, LayerNorm2d, transposed conv
            imp.copy(f"mask_decoder.upscale.{i}.{part}", MD + f"output_upscaling.{i}.{part}")
        for i in range(3):
            imp.copy(
                f"mask_decoder.hypernet.layers.{i}.{part}",
                MD + f"output_hypernetworks_mlps.0.layers.{i}.{part}",
            )
            key = MD + f"iou_prediction_head.layers.{i}.{part}"
            value = imp.take(key)
            if i == 2:  # one IoU per mask token: keep the served (first) one
                value = value[:1]
            imp.put(f"mask_decoder.iou_head.layers.{i}.{part}", value, key)
    imp.ignore(
        MD + "output_hypernetworks_mlps.[1-9].*",
        "hypernetworks of SAM's multimask outputs 1-3 (never served)",
    )
    imp.ignore("image_encoder.*", "SAM's image encoder: MedP-CLIP's image tower is the CLIP's")
    imp.ignore("pixel_mean", "SAM's pixel normalisation constant")
    imp.ignore("pixel_std", "SAM's pixel normalisation constant")
    if cfg.decoder.mask_tokens > 1:
        imp.report.notes.append(
            f"SAM's IoU head predicts {cfg.decoder.mask_tokens} IoUs: kept the first (the "
            "single-mask output's)"
        )


SAM_FRESH = (
    ("prompt_encoder.region_inside", "region map embeddings (ours, not SAM's): zero"),
    ("prompt_encoder.region_outside", "region map embeddings (ours, not SAM's): zero"),
    ("mask_decoder.neck.*", "neck from the CLIP ViT's patch features to the decoder width"),
)


def import_sam(
    model: MedPClip, sam_file: Path, *, heads: int = SAM_DECODER_HEADS, seed: int = 0
) -> tuple[MedPClip, Report]:
    """`model` with SAM's prompt encoder and mask decoder (configs resized to SAM's); the rest
    of `model` is kept as it is."""
    state = load_state_dict(Path(sam_file))
    prompt, decoder = sam_configs(state, model.cfg, heads)
    cfg = replace(model.cfg, prompt=prompt, decoder=decoder)
    new = build(cfg, seed=seed)
    target = new.state_dict()
    # everything outside the prompt encoder and decoder stays; the dense prompt projections
    # only while the prompt width is unchanged
    keep = {
        k: v
        for k, v in model.state_dict().items()
        if not k.startswith(("prompt_encoder.", "mask_decoder.")) and v.shape == target[k].shape
    }
    imp = Importer(state, target, "SAM")
    map_sam(imp, cfg)
    dense_reason = "dense prompt projections, sized for SAM's prompt width (behind the gates)"
    imported = imp.finish([*SAM_FRESH, ("image_encoder.dense_proj.*", dense_reason)], kept=keep)
    with torch.no_grad():
        new.load_state_dict({**target, **keep, **imported})
        new.prompt_encoder.region_inside.zero_()
        new.prompt_encoder.region_outside.zero_()
    return new.eval(), imp.report
