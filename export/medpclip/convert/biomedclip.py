"""BiomedCLIP (open_clip layout: timm ViT image tower, Hugging Face BERT text tower) -> MedP-CLIP.

A BiomedCLIP folder, as its model card ships it, holds `open_clip_config.json`,
`open_clip_pytorch_model.bin` and the BERT WordPiece tokenizer (`tokenizer.json` or `vocab.txt`).
Nothing is downloaded: a user points the importer at files they fetched.

What maps (every source tensor is either mapped or dropped for a stated reason):
- image tower: timm `patch_embed`, `cls_token`, `pos_embed`, `blocks.N` (the fused `qkv` split
  into q, k, v), final `norm` -> our ViT with `pre_norm=false` and LayerNorm eps 1e-6 (timm's);
  `head.proj` -> `proj`. Our region parts (gates at zero, region token at zero) leave the
  global path exactly the CLIP's.
- text tower: BERT embeddings (the token-type-0 row folded into the position embeddings, the
  context cut to `context_length`), encoder layers, [CLS] of the last hidden state, and the
  projection ("linear" or open_clip's "mlp").
- `logit_scale`.
The prompt encoder, the image encoder's region parts and the mask decoder start fresh (or from
SAM's prompt encoder and mask decoder, `medpclip.convert.sam`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from ..config import ModelConfig, TextConfig, VisionConfig
from ..model import MedPClip, build
from .state import ConversionError, Importer, Report, load_state_dict

CONFIG_FILE = "open_clip_config.json"
# open_clip's own preference when a folder holds several weight files
WEIGHT_FILES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
)
# our preprocessing normalises with OpenAI CLIP's mean/std (medpclip_core.imaging), as
# BiomedCLIP's preprocess_cfg does
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# heads are not visible in weight shapes: timm's standard ViT sizes
TIMM_VIT_HEADS = {"tiny": 3, "small": 6, "medium": 8, "base": 12, "large": 16, "huge": 16}
TIMM_LN_EPS = 1e-6  # timm's VisionTransformer norm layer
BERT_LN_EPS = 1e-12

V, T = "visual.trunk.", "text.transformer."


@dataclass
class Converted:
    model: MedPClip
    tokenizer: Tokenizer
    report: Report
    sources: list[Path]


def read_open_clip_folder(src: Path) -> tuple[dict, Path]:
    """(open_clip_config.json contents, the weights file) of a BiomedCLIP-style folder."""
    if not src.is_dir():
        raise ConversionError(f"{src} is not a folder (expected a BiomedCLIP download)")
    cfg_path = src / CONFIG_FILE
    if not cfg_path.is_file():
        raise ConversionError(f"{src} has no {CONFIG_FILE}: is it an open_clip model folder?")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{CONFIG_FILE} is not valid JSON: {exc}") from None
    if "model_cfg" not in cfg:
        raise ConversionError(f"{CONFIG_FILE} has no model_cfg")
    weights = next((src / n for n in WEIGHT_FILES if (src / n).is_file()), None)
    if weights is None:
        raise ConversionError(f"{src} has none of {', '.join(WEIGHT_FILES)}")
    return cfg, weights


def _count(state: dict, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in state if (m := rx.match(k))})


def _bert_config(src: Path, hf_name: str) -> dict | None:
    """The text tower's Hugging Face config.json, if it is in the folder or `hf_model_name` is
    a local folder; None otherwise (BERT conventions are then assumed and reported)."""
    for path in (src / "config.json", Path(hf_name) / "config.json"):
        if path.is_file():
            return json.loads(path.read_text())
    return None


def derive_config(
    cfg: dict,
    state: dict,
    src: Path,
    regions: ModelConfig,
    *,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    name: str = "biomedclip",
    notes: list[str],
) -> ModelConfig:
    """Our config for the open_clip model described by `cfg` and `state`: tower sizes from the
    weights, what shapes cannot show from the configs, region parts from `regions`."""
    m = cfg["model_cfg"]
    vc, tc = m.get("vision_cfg", {}), m.get("text_cfg", {})
    pre = cfg.get("preprocess_cfg", {})
    for key, ours in (("mean", CLIP_MEAN), ("std", CLIP_STD)):
        theirs = pre.get(key, ours)
        if len(theirs) != 3 or any(abs(a - b) > 1e-6 for a, b in zip(theirs, ours, strict=True)):
            raise ConversionError(
                f"preprocess_cfg {key} {theirs} differs from the one the server normalises with "
                f"({list(ours)}); served answers would not match the CLIP's"
            )
    # image tower: a timm ViT pooled from its class token, linear projection without bias
    timm_name = vc.get("timm_model_name")
    if not timm_name:
        raise ConversionError(
            "vision_cfg has no timm_model_name: only timm ViT image towers (the BiomedCLIP "
            "layout) are supported, not open_clip's native ViT"
        )
    if vc.get("timm_pool", "avg") not in ("", "token"):
        raise ConversionError(
            f"vision_cfg timm_pool {vc.get('timm_pool', 'avg')!r}: MedP-CLIP pools the class "
            'token (BiomedCLIP sets timm_pool ""); average pooling is not supported'
        )
    if vc.get("timm_proj", "linear") != "linear" or vc.get("timm_proj_bias", False):
        raise ConversionError('vision_cfg needs timm_proj "linear" without bias (BiomedCLIP\'s)')
    patch_w = state.get(V + "patch_embed.proj.weight")
    pos = state.get(V + "pos_embed")
    if patch_w is None or pos is None:
        raise ConversionError("no timm ViT weights (visual.trunk.patch_embed, pos_embed) found")
    width, patch = int(patch_w.shape[0]), int(patch_w.shape[-1])
    grid = int(round((pos.shape[1] - 1) ** 0.5))
    if grid * grid + 1 != pos.shape[1]:
        raise ConversionError("pos_embed is not a class token plus a square patch grid")
    image_size = int(vc.get("image_size", grid * patch))
    if image_size != grid * patch:
        raise ConversionError(
            f"vision_cfg image_size {image_size} != {grid} patches of {patch} in pos_embed"
        )
    depth = _count(state, re.escape(V) + r"blocks\.(\d+)\.")
    if vision_heads is None:
        size = re.match(r"vit_([a-z]+)_patch", timm_name)
        if not size or size.group(1) not in TIMM_VIT_HEADS:
            raise ConversionError(
                f"cannot tell the attention heads of timm model {timm_name!r} from its weights: "
                "pass --vision-heads"
            )
        vision_heads = TIMM_VIT_HEADS[size.group(1)]
    hidden = int(state[V + "blocks.0.mlp.fc1.weight"].shape[0])
    vision = VisionConfig(
        image_size=image_size,
        patch_size=patch,
        width=width,
        depth=depth,
        heads=vision_heads,
        mlp_ratio=hidden / width,
        prompt_blocks=min(regions.vision.prompt_blocks, depth),
        region_bias_init=regions.vision.region_bias_init,
        pre_norm=False,
        ln_eps=TIMM_LN_EPS,
    )
    # text tower: a Hugging Face BERT read at [CLS] of the last hidden state
    hf_name = tc.get("hf_model_name")
    if not hf_name:
        raise ConversionError(
            "text_cfg has no hf_model_name: only Hugging Face BERT text towers (the BiomedCLIP "
            "layout) are supported"
        )
    if tc.get("hf_pooler_type", "mean_pooler") != "cls_last_hidden_state_pooler":
        raise ConversionError(
            f"text_cfg hf_pooler_type {tc.get('hf_pooler_type', 'mean_pooler')!r}: MedP-CLIP "
            "reads [CLS] of the last hidden state (cls_last_hidden_state_pooler, BiomedCLIP's)"
        )
    proj = tc.get("hf_proj_type", "mlp")
    if proj not in ("linear", "mlp"):
        raise ConversionError(f"text_cfg hf_proj_type {proj!r}: only 'linear' and 'mlp'")
    if "context_length" not in tc:
        raise ConversionError("text_cfg has no context_length")
    words = state.get(T + "embeddings.word_embeddings.weight")
    if words is None:
        raise ConversionError("no BERT weights (text.transformer.embeddings) found")
    t_width = int(words.shape[1])
    bert = _bert_config(src, hf_name)
    if bert is not None:
        if bert.get("model_type", "bert") != "bert":
            raise ConversionError(f"text tower is {bert.get('model_type')!r}, not BERT")
        if bert.get("hidden_act", "gelu") != "gelu":
            raise ConversionError(f"BERT hidden_act {bert['hidden_act']!r}: only exact 'gelu'")
        if abs(bert.get("layer_norm_eps", BERT_LN_EPS) - BERT_LN_EPS) > 0:
            raise ConversionError(f"BERT layer_norm_eps {bert['layer_norm_eps']}: only 1e-12")
        if bert.get("position_embedding_type", "absolute") != "absolute":
            raise ConversionError("only absolute BERT position embeddings are supported")
        text_heads = text_heads or int(bert["num_attention_heads"])
    elif text_heads is None:
        text_heads = max(1, t_width // 64)
        notes.append(
            f"no BERT config.json in the folder: assumed {text_heads} text attention heads "
            "(BERT's 64 per head); pass --text-heads if that is wrong"
        )
    context = int(tc["context_length"])
    positions = int(state[T + "embeddings.position_embeddings.weight"].shape[0])
    if context > positions:
        raise ConversionError(f"context_length {context} > the {positions} BERT positions")
    if proj == "mlp":
        proj_hidden = int(state["text.proj.0.weight"].shape[0])
    else:
        proj_hidden = 0
    text = TextConfig(
        vocab_size=int(words.shape[0]),
        context_length=context,
        width=t_width,
        layers=_count(state, re.escape(T) + r"encoder\.layer\.(\d+)\."),
        heads=text_heads,
        mlp_ratio=int(state[T + "encoder.layer.0.intermediate.dense.weight"].shape[0]) / t_width,
        proj=proj,
        proj_hidden=proj_hidden,
    )
    embed_dim = int(m.get("embed_dim", 0))
    head = state.get("visual.head.proj.weight")
    if head is None or int(head.shape[0]) != embed_dim:
        raise ConversionError(f"visual.head.proj does not project to embed_dim {embed_dim}")
    return ModelConfig(
        name=name,
        embed_dim=embed_dim,
        logit_scale_init=regions.logit_scale_init,
        vision=vision,
        prompt=regions.prompt,
        text=text,
        decoder=regions.decoder,
    )


def map_towers(imp: Importer, cfg: ModelConfig) -> None:
    """The CLIP's tensors into ours (`imp.put` checks every shape)."""
    w = cfg.vision.width
    imp.put("image_encoder.cls_token", imp.take(V + "cls_token").reshape(w), V + "cls_token")
    imp.put("image_encoder.pos_embed", imp.take(V + "pos_embed")[0], V + "pos_embed")
    imp.copy("image_encoder.patch_embed.weight", V + "patch_embed.proj.weight")
    imp.copy("image_encoder.patch_embed.bias", V + "patch_embed.proj.bias")
    for i in range(cfg.vision.depth):
        s, o = f"{V}blocks.{i}.", f"image_encoder.blocks.{i}."
        for part in ("weight", "bias"):
            qkv = imp.take(s + f"attn.qkv.{part}")
            for j, name in enumerate("qkv"):
                imp.put(o + f"attn.{name}.{part}", qkv[j * w : (j + 1) * w], s + f"attn.qkv.{part}")
            imp.copy(o + f"attn.out.{part}", s + f"attn.proj.{part}")
            for ours, theirs in (
                ("norm1", "norm1"),
                ("norm2", "norm2"),
                ("mlp.layers.0", "mlp.fc1"),
                ("mlp.layers.1", "mlp.fc2"),
            ):
                imp.copy(o + f"{ours}.{part}", s + f"{theirs}.{part}")
    for part in ("weight", "bias"):
        imp.copy(f"image_encoder.ln_post.{part}", V + f"norm.{part}")
    imp.copy("image_encoder.proj.weight", "visual.head.proj.weight")

    e = T + "embeddings."
    imp.copy("text_encoder.token_embedding.weight", e + "word_embeddings.weight")
    # BERT adds token_type_embeddings[0] to every token of a one-segment text: fold it into the
    # positions, and keep the first context_length positions
    pos = imp.take(e + "position_embeddings.weight")[: cfg.text.context_length]
    types = imp.take(e + "token_type_embeddings.weight")
    origin = f"{e}position_embeddings.weight + {e}token_type_embeddings.weight[0]"
    imp.put("text_encoder.position_embedding", pos + types[0], origin)
    for part in ("weight", "bias"):
        imp.copy(f"text_encoder.norm.{part}", e + f"LayerNorm.{part}")
    for i in range(cfg.text.layers):
        s, o = f"{T}encoder.layer.{i}.", f"text_encoder.layers.{i}."
        for part in ("weight", "bias"):
            for ours, theirs in (
                ("attn.q", "attention.self.query"),
                ("attn.k", "attention.self.key"),
                ("attn.v", "attention.self.value"),
                ("attn.out", "attention.output.dense"),
                ("norm1", "attention.output.LayerNorm"),
                ("mlp.layers.0", "intermediate.dense"),
                ("mlp.layers.1", "output.dense"),
                ("norm2", "output.LayerNorm"),
            ):
                imp.copy(o + f"{ours}.{part}", s + f"{theirs}.{part}")
    if cfg.text.proj == "mlp":
        imp.copy("text_encoder.proj.0.weight", "text.proj.0.weight")
        imp.copy("text_encoder.proj.2.weight", "text.proj.2.weight")
    else:
        imp.copy("text_encoder.proj.weight", "text.proj.weight")
    imp.copy("logit_scale", "logit_scale")
    imp.ignore(e + "position_ids", "a buffer of position indices, not a weight")
    imp.ignore(e + "token_type_ids", "a buffer of token types, not a weight")
    imp.ignore(
        T + "pooler.*",
        "BERT's pooler (dense + tanh): the CLIP reads [CLS] of the last hidden state",
    )
    if cfg.text.context_length < imp.source[e + "position_embeddings.weight"].shape[0]:
        imp.report.notes.append(
            f"kept the first {cfg.text.context_length} of "
            f"{imp.source[e + 'position_embeddings.weight'].shape[0]} BERT position embeddings "
            "(the CLIP's context_length)"
        )


# our tensors a BiomedCLIP checkpoint does not have, and why (first match wins)
FRESH = (
    ("prompt_encoder.*", "region prompt encoder: not in a CLIP (fresh, or from SAM)"),
    ("mask_decoder.*", "mask decoder: not in a CLIP (fresh, or from SAM)"),
    ("image_encoder.gates", "region gates: zero, so the global path is the CLIP's"),
    ("image_encoder.region_token", "region token: zero, reads what the class token reads"),
    ("image_encoder.region_bias", "region attention bias: the config's initial value"),
    ("image_encoder.dense_proj.*", "dense prompt projections (behind zero gates)"),
)


def load_tokenizer_files(src: Path, hf_tokenizer: str | None) -> Tokenizer:
    """The BERT WordPiece tokenizer from `tokenizer.json` or `vocab.txt` in the folder (or in
    `hf_tokenizer_name` when that is a local folder)."""
    folders = [src] + ([Path(hf_tokenizer)] if hf_tokenizer and Path(hf_tokenizer).is_dir() else [])
    for folder in folders:
        if (folder / "tokenizer.json").is_file():
            tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
            break
        if (folder / "vocab.txt").is_file():
            from tokenizers.implementations import BertWordPieceTokenizer

            lower = True
            settings = folder / "tokenizer_config.json"
            if settings.is_file():
                lower = bool(json.loads(settings.read_text()).get("do_lower_case", True))
            tok = BertWordPieceTokenizer(str(folder / "vocab.txt"), lowercase=lower)._tokenizer
            break
    else:
        raise ConversionError(
            f"no tokenizer.json or vocab.txt in {src}: copy the BERT tokenizer files of the "
            "model card (hf_tokenizer_name) into the folder"
        )
    for special in ("[PAD]", "[CLS]", "[SEP]"):
        if tok.token_to_id(special) is None:
            raise ConversionError(f"the tokenizer has no {special} token (not a BERT WordPiece)")
    if tok.encode("x").ids[0] != tok.token_to_id("[CLS]"):
        raise ConversionError("the tokenizer does not start a text with [CLS]")
    return tok


def convert(
    src: Path,
    *,
    regions: ModelConfig | None = None,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    name: str = "biomedclip",
    seed: int = 0,
) -> Converted:
    """A BiomedCLIP folder -> a MedP-CLIP model (towers imported, region parts fresh)."""
    src = Path(src)
    regions = regions or ModelConfig.load("base")
    oc_cfg, weights = read_open_clip_folder(src)
    state = load_state_dict(weights)
    notes: list[str] = []
    cfg = derive_config(
        oc_cfg,
        state,
        src,
        regions,
        vision_heads=vision_heads,
        text_heads=text_heads,
        name=name,
        notes=notes,
    )
    model = build(cfg, seed=seed)
    imp = Importer(state, model.state_dict(), "BiomedCLIP")
    map_towers(imp, cfg)
    imported = imp.finish(FRESH)
    model.load_state_dict({**model.state_dict(), **imported})
    with torch.no_grad():  # zero-initialised by the model already; stated, not assumed
        model.image_encoder.gates.zero_()
        model.image_encoder.region_token.zero_()
    tok = load_tokenizer_files(
        src, oc_cfg["model_cfg"].get("text_cfg", {}).get("hf_tokenizer_name")
    )
    if tok.get_vocab_size() > cfg.text.vocab_size:
        raise ConversionError(
            f"the tokenizer has {tok.get_vocab_size()} tokens, the text tower only "
            f"{cfg.text.vocab_size} embeddings"
        )
    imp.report.notes = notes + imp.report.notes
    return Converted(model.eval(), tok, imp.report, [weights])
