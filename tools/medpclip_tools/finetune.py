"""Fine-tune the region parts of a MedP-CLIP checkpoint on your own annotated images.

    python -m medpclip_tools.finetune MANIFEST --from CKPT --out DIR [options]

MANIFEST is a JSON Lines file of annotated regions (format below). The images go through the
served preprocessing (`medpclip_core.inputs.prepare`: DICOM decoded with its own window tags,
PNG/JPEG as 8-bit display values), so training sees what the server sees. The candidate labels
are the manifest's distinct labels (sorted). Images are split into training and held-out ones
(the manifest's `split` fields, else `--holdout` of the images at random, seeded: all regions of
one image stay on one side).

Losses, as in `medpclip_tools.train`: region embedding vs label text cross-entropy, mask BCE +
Dice where the region has a mask, and the IoU head regressed on the achieved IoU.

What trains (`--unfreeze`):
  region    the prompt encoder, the mask decoder, and the image encoder's region parts (gates,
            dense_proj, region_token, region_bias); the default
  prompted  also the last `prompt_blocks` ViT blocks, ln_post and proj (the global embedding
            moves with them)
  all       everything, text encoder and logit_scale included
With `region` and `prompted` the prompt-free trunk is frozen: it runs once per image and is
cached, and each step runs the prompted blocks and the mask decoder only; the frozen text tower
embeds the labels once. logit_scale (the temperature of both REGION_PROBS and IMAGE_PROBS)
trains with `all` only: the region loss alone would sharpen it without bound on a few labels
and change the whole-image probabilities, which nothing here trains.

Which to choose (measured on 300 phantom slices, 500 steps, about a minute on 2 CPU cores):
teaching the embedded default model four label texts it never saw took held-out accuracy from
26 % to 93 % with `region` and to 100 % with `prompted`, Dice unchanged (0.91). A freshly
initialised model needs `prompted` or `all`: with its random text tower and projection frozen,
`region` learns the masks (Dice 0.02 -> 0.87) but hardly the labels (23 % -> 41 %).

Then the held-out regions are scored, each with its own prompt and the label list: before
fine-tuning in-process (the PyTorch reference path), and after it through the served path
(`--evaluate served`, the default: the checkpoint exported with `medpclip.export`, a real
tritonserver behind the gateway, `MedPClipClient` over gRPC, as `medpclip_tools.evaluate`).
Reported: accuracy (chance = 1 / labels) and mean Dice of the served mask against the mask file.

Writes DIR as a checkpoint (config.json, model.safetensors, tokenizer.json) that
`python -m medpclip.export --checkpoint DIR` takes as is, and DIR/finetune.json (the command,
the manifest's SHA-256, steps, minutes, what was unfrozen, held-out accuracy and Dice).

exit codes: 0 ok, 2 usage or a bad manifest (the message names the line), 1 other failure.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medpclip.model import CONFIG, TOKENIZER, MedPClip, load_checkpoint, save_checkpoint
from medpclip_core import imaging, inputs
from medpclip_core.errors import InputError
from medpclip_core.labels import load_tokenizer, tokenize

from . import manifest as M
from .evaluate import dice
from .train import mask_losses

UNFREEZE = ("region", "prompted", "all")
EVALUATE = ("served", "reference", "none")
REGION_PARTS = ("gates", "dense_proj", "region_token", "region_bias")
IOU_WEIGHT = 0.2  # as in train.py
# peak learning rate by --unfreeze: the region parts are few and start at zero (gates, region
# token), and move slowly at the rate whole blocks need (measured on 300 phantoms: region 1e-3
# learnt four new label texts to 34 % in 300 steps, 5e-3 to 94 % in 600)
DEFAULT_LR = {"region": 5e-3, "prompted": 3e-3, "all": 1e-3}


class UsageError(Exception):
    """Exit code 2: the command line or the manifest must change."""


# --- data ---------------------------------------------------------------------------------


@dataclass
class Item:
    """One manifest region, ready for the model."""

    region: M.Region
    image: int  # index into Data.images
    label: int  # index into Data.labels
    prompts: imaging.Prompts
    target: np.ndarray | None  # [M,M] mask coverage of the low-res grid, when a mask is given


@dataclass
class Data:
    labels: list[str]
    images: list[M.Image]
    transforms: list[imaging.Transform]  # per image: original -> letterbox
    pixels: np.ndarray  # [images,3,S,S], the served preprocessing's pixel values
    train: list[Item]
    val: list[Item]


def region_prompt(r: M.Region, mask: np.ndarray | None = None) -> dict[str, object]:
    """The prompt a region is trained and evaluated with: its box and/or points, else its mask
    (keyword arguments of `ModelInputs.with_prompts`; `mask`: the mask file, if loaded)."""
    if r.box or r.points:
        return {"box": r.box, "points": r.points}
    assert r.mask is not None
    return {"mask": (M.load_mask(r.mask) if mask is None else mask).astype(np.uint8)}


def prepare_data(man: M.Manifest, splits: dict[Path, str], model: MedPClip, tok) -> Data:
    """Every image through the served preprocessing once; each region's prompt mapped."""
    cfg = model.cfg
    labels = man.labels
    for label in labels:  # the checkpoint's tokenizer decides how long a label may be
        try:
            tokenize(tok, [label], max_labels=1)
        except InputError as exc:
            line = man.first_line_of(label)
            problem = str(exc).replace("label 0 ", "the label ", 1)
            raise UsageError(f"{man.path.name} line {line}: {problem}") from None
    images = list(man.images.values())
    transforms, pixels, train, val = [], [], [], []
    for i, img in enumerate(images):
        try:
            x = inputs.prepare(img.path.read_bytes(), cfg.vision.image_size, cfg.dims.M)
            transforms.append(x.transform)
            pixels.append(x.pixel_values)
            for r in img.regions:
                mask = M.load_mask(r.mask) if r.mask is not None else None
                target = (
                    None if mask is None else imaging.mask_to_grid(mask, x.transform, cfg.dims.M)
                )
                prompts = x.with_prompts(**region_prompt(r, mask)).prompts
                item = Item(r, i, labels.index(r.label), prompts, target)
                (val if splits[img.path] == "val" else train).append(item)
        except InputError as exc:  # read_manifest checked the same; kept for safety
            raise UsageError(f"{man.path.name} line {img.line}: {exc}") from None
    return Data(labels, images, transforms, np.concatenate(pixels), train, val)


def batch_prompts(items: Sequence[Item]) -> dict[str, torch.Tensor]:
    """The prompt encoder's inputs of several regions; shorter point lists padded with SAM's
    "no point" (label -1), as `inputs.stack` pads them."""
    n = max(it.prompts.point_coords.shape[1] for it in items)
    coords = np.zeros((len(items), n, 2), np.float32)
    labels = np.full((len(items), n), imaging.PAD_LABEL, np.int32)
    for b, it in enumerate(items):
        k = it.prompts.point_coords.shape[1]
        coords[b, :k] = it.prompts.point_coords[0]
        labels[b, :k] = it.prompts.point_labels[0]
    return {
        "point_coords": torch.from_numpy(coords),
        "point_labels": torch.from_numpy(labels),
        "mask_input": torch.from_numpy(np.concatenate([it.prompts.mask_input for it in items])),
        "has_mask": torch.from_numpy(np.concatenate([it.prompts.has_mask for it in items])),
    }


# --- the model ----------------------------------------------------------------------------


def unfreeze(model: MedPClip, mode: str) -> list[str]:
    """Set requires_grad for `mode`; returns the names of the parameters that train."""
    ie = model.image_encoder
    prompted = {f"blocks.{i}." for i in range(ie.trunk_depth, len(ie.blocks))}

    def trains(name: str) -> bool:
        if mode == "all":
            return True
        if name.startswith(("prompt_encoder.", "mask_decoder.")):
            return True
        if not name.startswith("image_encoder."):
            return False  # text encoder, logit_scale
        part = name[len("image_encoder.") :]
        if part.split(".")[0] in REGION_PARTS:
            return True
        return mode == "prompted" and (
            part.startswith(tuple(prompted)) or part.split(".")[0] in ("ln_post", "proj")
        )

    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(trains(name))
        if p.requires_grad:
            names.append(name)
    return names


class Runner:
    """The image path on batches of regions, with the trunk cached when it is frozen (each
    step then runs the prompted blocks and the mask decoder only), and the labels embedded
    once when the text tower is frozen."""

    def __init__(self, model: MedPClip, data: Data, tok, mode: str) -> None:
        self.model, self.data, self.mode = model, data, mode
        ids, attention = tokenize(tok, data.labels, max_labels=len(data.labels))
        self.ids, self.attention = torch.from_numpy(ids), torch.from_numpy(attention)
        self.pixels = torch.from_numpy(data.pixels)
        self.tokens: torch.Tensor | None = None
        self.text: torch.Tensor | None = None
        if mode != "all":
            self.refresh()

    @torch.no_grad()
    def refresh(self, batch: int = 64) -> None:
        """Cache what does not train: trunk tokens of every image, label embeddings."""
        enc = self.model.image_encoder
        self.tokens = torch.cat(
            [
                enc.forward_trunk(self.pixels[i : i + batch])
                for i in range(0, len(self.pixels), batch)
            ]
        )
        self.text = self.model.encode_text(self.ids, self.attention)

    def label_embeddings(self) -> torch.Tensor:
        if self.text is not None:
            return self.text
        return self.model.encode_text(self.ids, self.attention)

    def forward(self, items: Sequence[Item]) -> dict[str, torch.Tensor]:
        model = self.model
        p = batch_prompts(items)
        sparse, dense, region = model.prompt_encoder(
            p["point_coords"], p["point_labels"], p["mask_input"], p["has_mask"]
        )
        idx = torch.tensor([it.image for it in items])
        if self.tokens is not None:
            tokens = self.tokens[idx]
        else:
            tokens = model.image_encoder.forward_trunk(self.pixels[idx])
        _, region_emb, patches = model.image_encoder.forward_prompted(tokens, dense, region)
        masks, iou = model.mask_decoder(patches, sparse, dense)
        return {"region_embedding": region_emb, "mask_logits": masks, "iou": iou}


def losses(runner: Runner, items: Sequence[Item]) -> dict[str, torch.Tensor | float]:
    model = runner.model
    out = runner.forward(items)
    text = runner.label_embeddings()
    scale = model.logit_scale.exp().clamp(max=100)
    logits = scale * out["region_embedding"] @ text.T
    y = torch.tensor([it.label for it in items])
    region_loss = F.cross_entropy(logits, y)
    stats: dict[str, torch.Tensor | float] = {
        "region": region_loss.item(),
        "acc": (logits.argmax(1) == y).float().mean().item(),
    }
    loss = region_loss
    has = [b for b, it in enumerate(items) if it.target is not None]
    if has:
        tg = torch.from_numpy(np.stack([items[b].target for b in has]))
        mask_loss, iou, iou_loss = mask_losses(out["mask_logits"][has], tg, out["iou"][has, 0])
        loss = loss + mask_loss + IOU_WEIGHT * iou_loss
        stats.update(mask=mask_loss.item(), iou=iou.mean().item())
    stats["loss"] = loss
    return stats


# --- evaluation ---------------------------------------------------------------------------


@dataclass
class Scores:
    """Held-out results per region: was the top label right, its prompt form, and the Dice
    of the predicted mask where the region has a mask file (else None)."""

    path: str  # "reference" or "served"
    correct: list[bool] = field(default_factory=list)
    forms: list[str] = field(default_factory=list)
    dices: list[float | None] = field(default_factory=list)

    def add(self, item: Item, correct: bool, dice_: float | None) -> None:
        self.correct.append(correct)
        self.forms.append(item.region.prompt_form)
        self.dices.append(dice_)

    @staticmethod
    def _summary(correct: list[bool], dices: list[float | None]) -> dict[str, object]:
        d = [x for x in dices if x is not None]
        return {
            "regions": len(correct),
            "accuracy": round(float(np.mean(correct)), 4),
            "dice": round(float(np.mean(d)), 4) if d else None,
            "dice_regions": len(d),
        }

    def summary(self, n_labels: int) -> dict[str, object]:
        by_form = {}
        for form in sorted(set(self.forms)):
            keep = [i for i, f in enumerate(self.forms) if f == form]
            by_form[form] = self._summary(
                [self.correct[i] for i in keep], [self.dices[i] for i in keep]
            )
        return {
            "path": self.path,
            **self._summary(self.correct, self.dices),
            "chance": round(1 / n_labels, 4),
            "by_prompt": by_form,
        }


@torch.no_grad()
def evaluate_reference(runner: Runner, items: Sequence[Item], batch: int = 64) -> Scores:
    """The held-out regions in-process (PyTorch), as the reference pipeline computes them:
    the served preprocessing, the encoders, `mask_from_logits` back to the image's size."""
    model = runner.model
    was_training = model.training
    model.eval()
    text = runner.model.encode_text(runner.ids, runner.attention)
    scores = Scores("reference")
    for s in range(0, len(items), batch):
        chunk = items[s : s + batch]
        out = runner.forward(chunk)
        top = (out["region_embedding"] @ text.T).argmax(1)
        for b, it in enumerate(chunk):
            d = None
            if it.region.mask is not None:
                t = runner.data.transforms[it.image]
                pred = imaging.mask_from_logits(out["mask_logits"][b].numpy(), t)
                d = dice(pred, M.load_mask(it.region.mask))
            scores.add(it, int(top[b]) == it.label, d)
    model.train(was_training)
    return scores


def evaluate_served(
    checkpoint: Path,
    build: Path,
    data: Data,
    items: Sequence[Item],
    parity: bool,
    log: Callable[[str], object],
    workers: int = 4,
) -> Scores:
    """Export `checkpoint` into `build`, serve it (tritonserver behind the gateway) and ask it
    about every held-out region, with its prompt and the label list, over gRPC."""
    from medpclip import export
    from medpclip_client import MedPClipClient, Region

    from .serve import ServeProcess

    lines: list[str] = []
    start = time.perf_counter()
    result = export.export(
        checkpoint=checkpoint, out=build, skip_parity=not parity, log=lines.append
    )
    log(f"exported {checkpoint} to {result.repository} in {time.perf_counter() - start:.1f} s")
    if parity:
        worst = max((max(v) for v in result.parity.values()), default=0.0)
        log(f"  parity ONNX Runtime vs PyTorch: max |diff| {worst:.1e}")

    def ask(client: MedPClipClient, it: Item) -> tuple[bool, float | None]:
        r = it.region
        truth = M.load_mask(r.mask) if r.mask is not None else None
        p = region_prompt(r, truth)
        region = Region(
            points=p.get("points"),
            box=p.get("box"),
            mask=p.get("mask"),  # type: ignore[arg-type]
        )
        res = client.infer(r.image.read_bytes(), region, labels=data.labels)
        right = int(np.argmax(res.region_probs)) == it.label
        return right, None if truth is None else dice(res.mask, truth)

    start = time.perf_counter()
    with ServeProcess(result.repository, log_file=build / "serve.log") as server:
        log(f"serving on {server.grpc_url} ({time.perf_counter() - start:.1f} s to ready)")
        with MedPClipClient(server.grpc_url) as client, ThreadPoolExecutor(workers) as pool:
            answers = list(pool.map(lambda it: ask(client, it), items))
    scores = Scores("served")
    for it, (right, d) in zip(items, answers, strict=True):
        scores.add(it, right, d)
    return scores


# --- the command --------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m medpclip_tools.finetune",
        description=__doc__,
        epilog="manifest format (medpclip_tools.manifest):\n\n" + (M.__doc__ or ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("manifest", type=Path, metavar="MANIFEST", help="JSON Lines of regions")
    p.add_argument(
        "--from", dest="start", type=Path, required=True, metavar="CKPT",
        help="checkpoint folder to start from (config.json, model.safetensors, tokenizer.json)",
    )  # fmt: skip
    p.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="checkpoint folder to write"
    )
    p.add_argument("--steps", type=int, default=500, help="optimiser steps (default: %(default)s)")
    p.add_argument("--batch", type=int, default=32, help="regions per step (default: %(default)s)")
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak learning rate (default: "
        + ", ".join(f"{v:g} for {k}" for k, v in DEFAULT_LR.items())
        + ")",
    )
    p.add_argument(
        "--minutes", type=float, default=None,
        help="stop training after this much CPU time of this process (all its threads), "
        "or after --steps, whichever comes first; the learning-rate schedule follows the "
        "nearer of the two",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="batches, holdout (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    p.add_argument(
        "--holdout", type=float, default=0.2,
        help="fraction of the images held out when the manifest has no split fields "
        "(default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--unfreeze", choices=UNFREEZE, default="region", help="what trains (default: region)"
    )
    p.add_argument(
        "--evaluate", choices=EVALUATE, default="served",
        help="how the held-out regions are scored after fine-tuning: through a real "
        "tritonserver over gRPC, in-process with PyTorch, or not at all (default: served)",
    )  # fmt: skip
    p.add_argument(
        "--build", type=Path, default=None, metavar="DIR",
        help="--evaluate served: export into DIR and keep it (default: a temporary folder)",
    )  # fmt: skip
    p.add_argument(
        "--parity", action="store_true",
        help="--evaluate served: run the export's ONNX Runtime vs PyTorch check too",
    )  # fmt: skip
    p.add_argument(
        "--log-every", type=int, default=25, help="progress line every N steps (default: 25)"
    )
    args = p.parse_args(argv)
    for name in ("steps", "batch", "threads", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.lr is None:
        args.lr = DEFAULT_LR[args.unfreeze]
    if not args.lr > 0:
        p.error("--lr must be positive")
    if args.minutes is not None and not args.minutes > 0:
        p.error("--minutes must be positive")
    if not 0 <= args.holdout < 1:
        p.error("--holdout must be in [0, 1)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args, argv)
    except (UsageError, M.ManifestError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # export, server, client: the message, not a traceback
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def load_start(path: Path) -> MedPClip:
    if not (path / CONFIG).is_file():
        raise UsageError(f"--from {path}: not a checkpoint folder (no {CONFIG})")
    if not (path / TOKENIZER).is_file():
        raise UsageError(f"--from {path}: the checkpoint has no {TOKENIZER}")
    try:
        return load_checkpoint(path)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(f"--from {path}: {exc}") from None


def run(args: argparse.Namespace, argv: list[str] | None) -> int:
    wall0, cpu0 = time.perf_counter(), time.process_time()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    say = print

    if args.out.resolve() == args.start.resolve():
        raise UsageError("--out is the --from checkpoint; write the fine-tuned one elsewhere")
    man = M.read_manifest(args.manifest)
    splits = M.assign_splits(man, args.holdout, args.seed)
    model = load_start(args.start)
    tok = load_tokenizer(args.start / TOKENIZER, model.cfg.text.context_length)
    data = prepare_data(man, splits, model, tok)
    n_val_images = sum(1 for s in splits.values() if s == "val")
    if not data.train:
        raise UsageError(f"{man.path.name}: no training regions (every image is held out)")
    if not data.val and args.evaluate != "none":
        raise UsageError(
            f"{man.path.name}: nothing held out to evaluate (use split fields or --holdout > 0, "
            "or --evaluate none)"
        )
    say(
        f"manifest {man.path}: {len(man.regions)} regions on {len(man.images)} images, "
        f"{len(data.labels)} labels; training {len(data.train)} regions on "
        f"{len(man.images) - n_val_images} images, held out {len(data.val)} on {n_val_images}"
    )

    trainable = unfreeze(model, args.unfreeze)
    params = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)
    n_all = sum(p.numel() for p in model.parameters())
    scale_trains = "logit_scale" in trainable
    say(
        f"'{model.cfg.name}' from {args.start}: unfreeze {args.unfreeze}, {n_train:,} of "
        f"{n_all:,} parameters train; logit_scale {'trains' if scale_trains else 'frozen'}"
    )
    runner = Runner(model, data, tok, args.unfreeze)
    if args.unfreeze != "all":
        say(f"trunk tokens of {len(data.images)} images and {len(data.labels)} labels cached")

    before = None
    if args.evaluate != "none":
        before = evaluate_reference(runner, data.val)
        s = before.summary(len(data.labels))
        say(f"before: held-out accuracy {s['accuracy']:.1%}, Dice {_fmt(s['dice'])} (reference)")

    stats = train(runner, data, params, args, say)
    model.eval()
    save_checkpoint(model, args.out, args.start / TOKENIZER)
    train_wall = (time.perf_counter() - wall0) / 60
    train_cpu = (time.process_time() - cpu0) / 60

    results: dict[str, dict[str, object]] = {}
    if before is not None:
        results["before_reference"] = before.summary(len(data.labels))
    if args.evaluate != "none":
        results["after_reference"] = evaluate_reference(runner, data.val).summary(len(data.labels))
    record = {
        "command": "python -m medpclip_tools.finetune "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "manifest": str(man.path),
        "manifest_sha256": man.sha256,
        "from": str(args.start),
        "model": model.cfg.name,
        "labels": data.labels,
        "images": {"train": len(man.images) - n_val_images, "val": n_val_images},
        "regions": {"train": len(data.train), "val": len(data.val)},
        "split": "manifest" if any(r.split for r in man.regions) else f"holdout {args.holdout}",
        "unfreeze": args.unfreeze,
        "trainable_parameters": n_train,
        "logit_scale_trained": scale_trains,
        "seed": args.seed,
        "batch": args.batch,
        "lr": args.lr,
        "threads": args.threads,
        "steps": stats["steps"],
        "steps_planned": args.steps,
        "stopped_by": stats["stopped_by"],
        "minutes": round(train_wall, 2),
        "cpu_minutes": round(train_cpu, 2),
        "final_training_ema": stats["ema"],
        "held_out": results,
    }
    record_path = args.out / "finetune.json"
    # written now, and again with the served scores: a server that fails to start (exit 1)
    # leaves the checkpoint and its record
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    if args.evaluate == "served":
        with tempfile.TemporaryDirectory(prefix="medpclip-finetune-") as tmp:
            build = args.build or Path(tmp)
            served = evaluate_served(args.out, build, data, data.val, args.parity, say)
        results["after_served"] = served.summary(len(data.labels))
        record_path.write_text(json.dumps(record, indent=2) + "\n")
    report(record, args.out, say)
    return 0


def train(
    runner: Runner,
    data: Data,
    params: list[torch.nn.Parameter],
    args: argparse.Namespace,
    say: Callable[[str], object],
) -> dict[str, object]:
    """AdamW with warmup and a cosine decay over the nearer of --steps and --minutes."""
    model = runner.model
    model.train()
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    rng = np.random.default_rng(args.seed)
    order: list[int] = []
    budget = args.minutes * 60 if args.minutes else None
    wall0, cpu0 = time.perf_counter(), time.process_time()
    ema: dict[str, float] = {}
    stopped_by, step = "steps", 0

    def progress() -> float:
        done = step / args.steps
        if budget is not None:
            done = max(done, (time.process_time() - cpu0) / budget)
        return min(1.0, done)

    while step < args.steps:
        p = progress()
        if budget is not None and p >= 1.0:
            stopped_by = "minutes"
            break
        factor = min(1.0, (p + 1e-9) / 0.05) * 0.5 * (1 + math.cos(math.pi * p))
        for group in opt.param_groups:
            group["lr"] = args.lr * factor
        if len(order) < args.batch:  # epochs of shuffled training regions
            order += rng.permutation(len(data.train)).tolist() * max(
                1, -(-args.batch // len(data.train))
            )
        batch, order = [data.train[i] for i in order[: args.batch]], order[args.batch :]
        stats = losses(runner, batch)
        loss = stats.pop("loss")
        opt.zero_grad()
        loss.backward()  # type: ignore[union-attr]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        ema = {
            k: float(v) if k not in ema else 0.9 * ema[k] + 0.1 * float(v) for k, v in stats.items()
        }
        if step % args.log_every == 0 or step == 1 or step == args.steps:
            wall = (time.perf_counter() - wall0) / 60
            cpu = (time.process_time() - cpu0) / 60
            line = "  ".join(f"{k} {v:.3f}" for k, v in ema.items())
            say(f"[{step:5d}/{args.steps}] {wall:5.2f} min (CPU {cpu:5.2f})  {line}")
    if stopped_by == "minutes":
        say(f"stopped after {step} steps: --minutes {args.minutes:g} of CPU time used")
    return {
        "steps": step,
        "stopped_by": stopped_by,
        "ema": {k: round(v, 4) for k, v in ema.items()},
    }


def _fmt(d: object) -> str:
    return "n/a (no masks)" if d is None else f"{d:.3f}"


def report(record: dict, out: Path, say: Callable[[str], object]) -> None:
    held = record["held_out"]
    say(
        f"fine-tuned '{record['model']}' ({record['unfreeze']}: "
        f"{record['trainable_parameters']:,} parameters) for {record['steps']} steps in "
        f"{record['minutes']:.1f} min (CPU {record['cpu_minutes']:.1f} min)"
    )
    if held:
        first = next(iter(held.values()))
        say(
            f"held-out: {first['regions']} regions on {record['images']['val']} images, "
            f"{len(record['labels'])} labels (chance {first['chance']:.1%})"
        )
        names = {
            "before_reference": "before (reference)",
            "after_reference": "after (reference)",
            "after_served": "after (served: tritonserver, gRPC)",
        }
        for key, name in names.items():
            if key in held:
                s = held[key]
                say(f"  {name:36s} accuracy {s['accuracy']:6.1%}  Dice {_fmt(s['dice'])}")
        last = held.get("after_served") or held.get("after_reference")
        if last:
            say(f"  after ({last['path']}), by prompt:")
            for form, v in last["by_prompt"].items():
                say(
                    f"    {form:12s} accuracy {v['accuracy']:6.1%}  Dice {_fmt(v['dice'])}  "
                    f"({v['regions']} regions)"
                )
    say(f"saved {out} (finetune.json beside the weights); serve it with:")
    say(f"  python -m medpclip.export --checkpoint {out} --out build")


if __name__ == "__main__":
    sys.exit(main())
