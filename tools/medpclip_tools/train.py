"""Train the embedded default model on phantom slices (2 CPU cores, minutes, fixed seed).

    python -m medpclip_tools.train --out export/medpclip/default_model

Losses: region-text cross-entropy over the finding labels for point, box and mask prompts;
image-caption contrastive loss on whole images (some samples carry no prompt, so the global
path keeps learning); mask BCE + Dice for the mask decoder, and the IoU head regressed on the
achieved IoU. Images, prompts and labels go through the served preprocessing
(`medpclip_core.inputs.prepare`, `medpclip_core.labels.tokenize`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medpclip.config import ModelConfig
from medpclip.model import MedPClip, build, save_checkpoint
from medpclip.tokenizer import DEFAULT_TOKENIZER
from medpclip_core import imaging, inputs
from medpclip_core.labels import load_tokenizer, tokenize

from .phantoms import FINDINGS, KINDS, WINDOW, Phantom, phantoms

PROMPT_KINDS = ("point", "box", "mask", "none")
PROMPT_P = (0.35, 0.3, 0.2, 0.15)


@dataclass
class Sample:
    prepared: inputs.ModelInputs  # the slice in its window, letterboxed, with no prompt
    phantom: Phantom
    targets: list[np.ndarray]  # per finding, [M,M] coverage of the low-res grid


def prepare(ps: list[Phantom], cfg: ModelConfig) -> list[Sample]:
    """Each slice through the served preprocessing once; prompts vary per step
    (`ModelInputs.with_prompts`)."""
    out = []
    for p in ps:
        x = inputs.prepare(
            p.hu.astype(np.float32), cfg.vision.image_size, cfg.dims.M, window=WINDOW
        )
        targets = [imaging.mask_to_grid(f.mask, x.transform, cfg.dims.M) for f in p.findings]
        out.append(Sample(x, p, targets))
    return out


def sample_prompt(s: Sample, j: int, kind: str, rng: np.random.Generator) -> inputs.ModelInputs:
    """The slice with a random prompt of `kind` on its finding `j`."""
    f = s.phantom.findings[j]
    h, w = f.mask.shape
    if kind == "point":
        ys, xs = np.nonzero(f.mask)
        k = rng.integers(len(ys), size=1 + int(rng.random() < 0.3))
        pts = np.stack([xs[k], ys[k]], 1).astype(np.float32) + 0.5
        labels = np.ones(len(pts), np.int32)
        if rng.random() < 0.3:  # a background point elsewhere in the body
            by, bx = np.nonzero(~f.mask & (s.phantom.hu > -500))
            b = rng.integers(len(by))
            pts = np.concatenate([pts, [[bx[b] + 0.5, by[b] + 0.5]]]).astype(np.float32)
            labels = np.append(labels, 0).astype(np.int32)
        return s.prepared.with_prompts(points=pts, point_labels=labels)
    if kind == "box":
        x0, y0, x1, y1 = np.array(f.box) + rng.uniform(-2, 2, 4)
        box = np.array([max(0, x0), max(0, y0), min(w, x1), min(h, y1)], np.float32)
        return s.prepared.with_prompts(box=box)
    if kind == "mask":
        return s.prepared.with_prompts(mask=f.mask.astype(np.uint8))
    return s.prepared


def caption(p: Phantom, rng: np.random.Generator) -> str:
    parts = [FINDINGS[f.kind][rng.integers(4)] for f in p.findings]
    rng.shuffle(parts)
    return "a ct slice with " + " and ".join(parts)


def encode(model: MedPClip, tok, texts: list[str]) -> torch.Tensor:
    """Text embeddings of `texts`, tokenized as the server does (a batch may hold more texts
    than one request's label limit)."""
    ids, attention = tokenize(tok, texts, max_labels=len(texts))
    return model.encode_text(torch.from_numpy(ids), torch.from_numpy(attention))


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = logits.sigmoid().flatten(1)
    t = target.flatten(1)
    return (1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).mean()


def mask_losses(
    logits: torch.Tensor, target: torch.Tensor, iou_pred: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask BCE + Dice of `logits` [B,M,M] against `target` (coverage in [0, 1]), the IoU the
    thresholded masks achieve [B], and the IoU head's `iou_pred` [B] regressed on it."""
    mask_loss = F.binary_cross_entropy_with_logits(logits, target) + dice_loss(logits, target)
    with torch.no_grad():
        pred, truth = logits > 0, target > 0.5
        inter = (pred & truth).flatten(1).sum(1).float()
        iou = inter / (pred | truth).flatten(1).sum(1).float().clamp(min=1)
    return mask_loss, iou, F.mse_loss(iou_pred, iou)


def train_step(model, data, rng, batch, cfg, tok) -> dict[str, float]:
    idx = rng.integers(len(data), size=batch)
    kinds = rng.choice(PROMPT_KINDS, size=batch, p=PROMPT_P)
    picks = [int(rng.integers(len(data[i].phantom.findings))) for i in idx]
    items = [sample_prompt(data[i], j, k, rng) for i, j, k in zip(idx, picks, kinds, strict=True)]
    out = model(**{k: torch.from_numpy(v) for k, v in inputs.stack(items).items()})
    scale = model.logit_scale.exp().clamp(max=100)

    # region -> label, over one random phrasing per kind
    label_texts = [FINDINGS[k][rng.integers(4)] for k in KINDS]
    t_labels = encode(model, tok, label_texts)
    prompted = torch.tensor(kinds != "none")
    target_kind = torch.tensor(
        [data[i].phantom.findings[j].kind_index for i, j in zip(idx, picks, strict=True)]
    )
    logits = scale * out["region_embedding"] @ t_labels.T
    region_loss = F.cross_entropy(logits[prompted], target_kind[prompted])
    region_acc = (logits[prompted].argmax(1) == target_kind[prompted]).float().mean()

    # whole image <-> caption, several images may share a finding set
    sets = [frozenset(f.kind for f in data[i].phantom.findings) for i in idx]
    t_caps = encode(model, tok, [caption(data[i].phantom, rng) for i in idx])
    same = torch.tensor([[a == b for b in sets] for a in sets], dtype=torch.float32)
    same = same / same.sum(1, keepdim=True)
    g_logits = scale * out["global_embedding"] @ t_caps.T
    global_loss = 0.5 * (
        -(same * g_logits.log_softmax(1)).sum(1).mean()
        - (same * g_logits.log_softmax(0)).sum(0).mean()
    )

    # masks for every prompted sample
    target = torch.from_numpy(
        np.stack([data[i].targets[j] for i, j in zip(idx, picks, strict=True)])
    )
    mask_loss, iou, iou_loss = mask_losses(
        out["mask_logits"][prompted], target[prompted], out["iou"][prompted, 0]
    )
    loss = region_loss + 0.5 * global_loss + mask_loss + 0.2 * iou_loss
    return {
        "loss": loss,
        "region": region_loss.item(),
        "acc": region_acc.item(),
        "global": global_loss.item(),
        "mask": mask_loss.item(),
        "iou": iou.mean().item(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m medpclip_tools.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default="tiny")
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    p.add_argument("--images", type=int, default=3000, help="training phantoms")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    cfg = ModelConfig.load(args.config)
    start = time.perf_counter()
    print(f"generating {args.images} phantoms (seed {args.seed}) ...", flush=True)
    data = prepare(phantoms(args.seed, args.images), cfg)
    tok = load_tokenizer(DEFAULT_TOKENIZER, cfg.text.context_length)
    model = build(cfg, seed=args.seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (args.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    ema: dict[str, float] = {}
    for step in range(args.steps):
        stats = train_step(model, data, rng, args.batch, cfg, tok)
        opt.zero_grad()
        stats.pop("loss").backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema = {k: v if k not in ema else 0.95 * ema[k] + 0.05 * v for k, v in stats.items()}
        if step % 25 == 0 or step == args.steps - 1:
            elapsed = time.perf_counter() - start
            line = " ".join(f"{k} {v:.3f}" for k, v in ema.items())
            print(f"[{step + 1:5d}/{args.steps}] {elapsed / 60:5.1f} min  {line}", flush=True)
    model.eval()
    save_checkpoint(model, args.out, DEFAULT_TOKENIZER)
    minutes = (time.perf_counter() - start) / 60
    record = {
        "command": "python -m medpclip_tools.train "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "seed": args.seed,
        "steps": args.steps,
        "batch": args.batch,
        "images": args.images,
        "minutes": round(minutes, 1),
        "final_training_ema": {k: round(v, 4) for k, v in ema.items()},
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"saved {args.out} after {minutes:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
