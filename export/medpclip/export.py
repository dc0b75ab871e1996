"""Export MedP-CLIP to ONNX, check parity with PyTorch, and generate the Triton repository.

    python -m medpclip.export --config tiny --out build

Idempotent: a second run with the same checkpoint, config and code reuses every output.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from medpclip_core import tensors as T

from . import onnx_export, repository
from . import tensorrt_engine as trt_engine
from .config import ModelConfig, available_sizes
from .model import CONFIG, MedPClip, build, load_checkpoint, save_checkpoint
from .real_inputs import real_inputs
from .tokenizer import DEFAULT_TOKENIZER

REPO = Path(__file__).resolve().parents[2]
# The embedded default model (trained on phantoms, see its README) when present.
DEFAULT_CHECKPOINT = REPO / "export" / "default_model"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m medpclip.export",
        description=(
            "Export MedP-CLIP's prompt, image and text encoders and its mask decoder to ONNX, "
            "check ONNX Runtime against PyTorch (max |diff| <= 1e-4), and write a Triton "
            "model repository. Reuses earlier outputs when nothing changed."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="checkpoint folder (config.json, model.safetensors, tokenizer.json); "
        f"default: the embedded model in {DEFAULT_CHECKPOINT.relative_to(REPO)} "
        "if present, else a seeded fresh model of --config",
    )
    p.add_argument(
        "--config",
        default="tiny",
        help=f"model size for a fresh model: {', '.join(available_sizes())} "
        "or a path to a config JSON",
    )
    p.add_argument("--seed", type=int, default=0, help="initialisation seed of a fresh model")
    p.add_argument(
        "--out",
        type=Path,
        default=REPO / "build",
        help="output folder (onnx/, checkpoint/, model_repository/)",
    )
    p.add_argument(
        "--flavour",
        choices=repository.FLAVOURS,
        default="onnxruntime",
        help="how the encoders are served",
    )
    p.add_argument(
        "--precision",
        choices=trt_engine.PRECISIONS,
        default="fp16",
        help="TensorRT engine precision (fp16 keeps LayerNorm, softmax and reductions in fp32)",
    )
    p.add_argument(
        "--int8",
        action="store_true",
        help="onnxruntime flavour: serve ONNX Runtime int8 (dynamic) quantised image and text "
        "encoders and mask decoder; checked against fp32 (embedding cosine >= 0.99)",
    )
    p.add_argument(
        "--engines",
        type=Path,
        default=None,
        help="folder of TensorRT engines (default: OUT/engines)",
    )
    p.add_argument(
        "--ort-threads",
        type=int,
        default=0,
        help="ONNX Runtime intra-op threads per encoder instance (0 = all cores)",
    )
    p.add_argument(
        "--instances", type=int, default=1, help="onnxruntime flavour: instances per encoder"
    )
    p.add_argument(
        "--queue-delay-us",
        type=int,
        default=2000,
        help="dynamic batching: how long a request may wait for others to batch with",
    )
    p.add_argument("--skip-parity", action="store_true", help="skip the ORT vs PyTorch check")
    return p.parse_args(argv)


def resolve_checkpoint(args: argparse.Namespace) -> tuple[MedPClip, Path]:
    if args.checkpoint is not None:
        return load_checkpoint(args.checkpoint), args.checkpoint
    if args.config == "tiny" and (DEFAULT_CHECKPOINT / CONFIG).is_file():
        return load_checkpoint(DEFAULT_CHECKPOINT), DEFAULT_CHECKPOINT
    cfg = ModelConfig.load(args.config)
    directory = args.out / "checkpoint" / f"{cfg.name}-seed{args.seed}"
    if (directory / CONFIG).is_file():
        model = load_checkpoint(directory)
        if model.cfg == cfg:
            return model, directory
    model = build(cfg, seed=args.seed)
    save_checkpoint(model, directory, DEFAULT_TOKENIZER)
    print(f"  fresh '{cfg.name}' model (seed {args.seed}) saved to {directory}")
    return model, directory


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    print("[1/4] model")
    try:
        model, checkpoint = resolve_checkpoint(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    n = sum(p.numel() for p in model.parameters())
    print(f"  '{model.cfg.name}' from {checkpoint} ({n / 1e6:.2f} M parameters)")

    print("[2/4] ONNX export")
    onnx_dir = args.out / "onnx"
    for name, ex in onnx_export.EXPORTABLES.items():
        key = onnx_export.cache_key(checkpoint, ex.spec)
        onnx_export.export_onnx(model, name, onnx_dir / f"{name}.onnx", key)

    ok = True
    if args.skip_parity:
        print("[3/4] parity: skipped")
    else:
        print(
            f"[3/4] parity, ONNX Runtime vs PyTorch (fp32, max |diff|, limit "
            f"{onnx_export.PARITY_ATOL:g})"
        )
        real = real_inputs(model, checkpoint / "tokenizer.json")
        for name, ex in onnx_export.EXPORTABLES.items():
            path = onnx_dir / f"{name}.onnx"
            for kind, inputs in (("random", ex.sample_inputs(model.cfg)), ("real", real[name])):
                diffs = onnx_export.parity(model, name, path, inputs)
                worst = max(diffs.values())
                ok &= worst <= onnx_export.PARITY_ATOL
                detail = ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
                flag = "ok" if worst <= onnx_export.PARITY_ATOL else "FAIL"
                print(f"  {name:15s} {kind:6s} {worst:.2e} {flag}  ({detail})")
    if not ok:
        print("error: ONNX Runtime differs from PyTorch beyond the limit", file=sys.stderr)
        return 1

    if args.int8:
        print("[3a] int8 quantisation (ONNX Runtime, dynamic)")
        from .int8 import check_int8

        for name in onnx_export.INT8_MODELS:
            onnx_export.quantize_int8(onnx_dir / f"{name}.onnx")
        worst = check_int8(model, onnx_dir, checkpoint / "tokenizer.json")
        if worst < 0.99:
            print(
                f"error: int8 embeddings drift from fp32 (cosine {worst:.4f} < 0.99)",
                file=sys.stderr,
            )
            return 1
    engines = args.engines or args.out / "engines"
    if args.flavour == "tensorrt":
        print(f"[3b] TensorRT engines ({args.precision}) in {engines}")
        try:
            for spec in T.ENCODERS:
                trt_engine.build_engine(
                    onnx_dir / f"{spec.name}.onnx",
                    engines / spec.name,
                    spec,
                    model.cfg.dims,
                    args.precision,
                )
        except trt_engine.EngineError as exc:
            for spec in T.ENCODERS:  # the by-hand route still works from here
                onnx = onnx_dir / f"{spec.name}.onnx"
                trt_engine.write_trtexec_script(
                    onnx,
                    engines / spec.name,
                    trt_engine.profile(spec, model.cfg.dims),
                    args.precision,
                )
            print(f"error: {exc}", file=sys.stderr)
            return 1

    print("[4/4] Triton model repository")
    try:
        repository.generate(
            args.out / "model_repository",
            onnx_dir,
            checkpoint,
            flavour=args.flavour,
            ort_threads=args.ort_threads,
            instances=args.instances,
            queue_delay_us=args.queue_delay_us,
            engines_dir=engines,
            precision=args.precision,
            int8=args.int8,
        )
    except trt_engine.EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
