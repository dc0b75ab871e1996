"""python -m medpclip.convert: see medpclip.convert (module docstring) and --help."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

from ..config import ModelConfig, available_sizes
from ..model import TOKENIZER, load_checkpoint, save_checkpoint
from . import __doc__ as DOC
from .biomedclip import convert
from .sam import SAM_DECODER_HEADS, import_sam
from .state import ConversionError, Report

RECORD = "conversion.json"
EPILOG = """\
exit codes: 0 converted, 1 the source cannot be converted (the message says why), 2 usage.

Nothing is downloaded. For BiomedCLIP, fetch the model card's files
(open_clip_config.json, open_clip_pytorch_model.bin and the tokenizer's tokenizer.json or
vocab.txt) into one folder. The written checkpoint is what `python -m medpclip.export
--checkpoint CKPT_DIR` takes; `python -m medpclip_tools.finetune` teaches it regions.
"""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m medpclip.convert",
        description=DOC,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="source", required=True, metavar="{biomedclip,sam}")
    b = sub.add_parser(
        "biomedclip",
        help="an open_clip BiomedCLIP folder -> a MedP-CLIP checkpoint",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("src", type=Path, help="folder with open_clip_config.json, weights, tokenizer")
    b.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    b.add_argument(
        "--sam",
        type=Path,
        help="also import a SAM checkpoint's prompt encoder and "
        "mask decoder (e.g. sam_vit_b_01ec64.pth)",
    )
    b.add_argument(
        "--regions",
        default="base",
        help="size or config JSON whose prompt, "
        "decoder and region settings the fresh parts take (default: base; "
        f"bundled: {', '.join(available_sizes())})",
    )
    b.add_argument(
        "--vision-heads",
        type=int,
        help="attention heads of the image tower (default: from the timm model name)",
    )
    b.add_argument(
        "--text-heads",
        type=int,
        help="attention heads of the text tower (default: "
        "from a BERT config.json in SRC, else width / 64)",
    )
    b.add_argument("--name", default="biomedclip", help="config name of the result")
    _common(b)
    s = sub.add_parser(
        "sam",
        help="SAM's prompt encoder and mask decoder into a MedP-CLIP checkpoint",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("sam", type=Path, help="segment-anything checkpoint (.pth)")
    s.add_argument("--into", type=Path, required=True, help="MedP-CLIP checkpoint to start from")
    s.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    _common(s)
    return p


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sam-heads",
        type=int,
        default=SAM_DECODER_HEADS,
        help=f"attention heads of SAM's decoder (default {SAM_DECODER_HEADS}, all SAMs)",
    )
    p.add_argument("--seed", type=int, default=0, help="initialisation seed of the fresh parts")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out folder")


def _print_report(title: str, report: Report) -> None:
    print(title)
    for line in report.summary():
        print(f"  {line}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out: Path = args.out
    if out.exists() and any(out.iterdir()) and not args.force:
        print(f"error: {out} is not empty (pass --force to overwrite)", file=sys.stderr)
        return 2
    start = time.perf_counter()
    reports: dict[str, Report] = {}
    sources: list[Path] = []
    try:
        if args.source == "biomedclip":
            print(f"reading {args.src} ...", flush=True)
            regions = ModelConfig.load(args.regions)
            done = convert(
                args.src,
                regions=regions,
                vision_heads=args.vision_heads,
                text_heads=args.text_heads,
                name=args.name,
                seed=args.seed,
            )
            model, tokenizer, sources = done.model, done.tokenizer, list(done.sources)
            reports["biomedclip"] = done.report
            _print_report("BiomedCLIP -> MedP-CLIP:", done.report)
        else:
            model = load_checkpoint(args.into)
            tokenizer = args.into / TOKENIZER
        if args.sam:
            print(f"reading {args.sam} ...", flush=True)
            model, reports["sam"] = import_sam(
                model, args.sam, heads=args.sam_heads, seed=args.seed
            )
            sources.append(args.sam)
            _print_report("SAM -> MedP-CLIP:", reports["sam"])
    except (ConversionError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    save_checkpoint(model, out, tokenizer)
    record = {
        "command": "python -m medpclip.convert " + " ".join(sys.argv[1:] if argv is None else argv),
        "sources": {str(p): _sha256(p) for p in sources},
        "config": model.cfg.to_dict(),
        "reports": {k: r.to_dict() for k, r in reports.items()},
    }
    (out / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    n = sum(p.numel() for p in model.parameters())
    print(
        f"wrote {out} ('{model.cfg.name}', {n / 1e6:.2f} M parameters, "
        f"{time.perf_counter() - start:.1f} s); next: python -m medpclip.export --checkpoint {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
