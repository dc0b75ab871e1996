"""Export MedP-CLIP to ONNX, check parity with PyTorch, and generate the Triton repository.

    result = export(ExportOptions(out=Path("build")))   # the API
    python -m medpclip.export --config tiny --out build # the CLI, a thin layer over it

Idempotent: a second run with the same checkpoint, config and code reuses every output.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

from medpclip_core import agreement, cpu
from medpclip_core import tensors as T

from . import onnx_export, repository
from . import tensorrt_engine as trt_engine
from .config import DEFAULT_CHECKPOINT, ModelConfig, available_sizes
from .model import CONFIG, MedPClip, build, load_checkpoint, save_checkpoint
from .real_inputs import real_inputs
from .tokenizer import DEFAULT_TOKENIZER

INT8_MIN_COSINE = agreement.MIN_COSINE  # int8 vs fp32 vectors on real inputs (every output)


class ExportError(Exception):
    """The export cannot produce a repository that would serve correct answers (a missing
    checkpoint, ONNX Runtime off PyTorch, int8 drift, a TensorRT engine that cannot be built)."""


@dataclass(frozen=True)
class ExportOptions:
    """What to export and how; the CLI flags of the same names."""

    checkpoint: Path | None = None  # None: the embedded model (tiny), else a fresh `config`
    config: str = "tiny"  # model size or config JSON for a fresh model
    seed: int = 0  # initialisation seed of a fresh model
    out: Path = Path("build")  # onnx/, checkpoint/, engines/, model_repository/
    flavour: str = "onnxruntime"  # or "tensorrt"
    precision: str = "fp16"  # TensorRT engine precision
    int8: bool = False  # onnxruntime flavour: int8 image/text encoders and mask decoder
    engines: Path | None = None  # TensorRT engines folder (default: out/engines)
    ort_threads: int = 0  # ONNX Runtime intra-op threads per encoder instance (0 = all cores)
    instances: int = 1  # onnxruntime flavour: instances per encoder
    queue_delay_us: int = 2000  # dynamic batching delay
    skip_parity: bool = False


@dataclass
class ExportResult:
    """Where everything went and what was measured."""

    repository: Path  # the served copy, ready for tritonserver / medpclip_tools.serve
    checkpoint: Path
    onnx_dir: Path
    model: str  # config name, e.g. "tiny"
    parameters: int
    # model -> (random inputs, real inputs) max |ONNX Runtime - PyTorch|; empty if skipped
    parity: dict[str, tuple[float, float]] = field(default_factory=dict)
    int8_cosine: float | None = None  # smallest int8 vs fp32 cosine, with options.int8
    seconds: float = 0.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m medpclip.export",
        description=(
            "Export MedP-CLIP's prompt, image and text encoders and its mask decoder to ONNX "
            "(and the image encoder once more as its prompt-free trunk and its prompted blocks, "
            "for encode once, prompt many), check ONNX Runtime against PyTorch (max |diff| <= "
            "1e-4), and write a Triton model repository. Reuses earlier outputs when nothing "
            "changed."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="checkpoint folder (config.json, model.safetensors, tokenizer.json); "
        "default: the embedded model (medpclip/default_model) "
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
        default=Path("build"),
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
    p.add_argument(
        "--skip-parity",
        action="store_true",
        help="skip the ORT vs PyTorch check (and, in the tensorrt flavour, the engines vs ORT one)",
    )
    return p.parse_args(argv)


def resolve_checkpoint(
    options: ExportOptions, log: Callable[[str], object] = print
) -> tuple[MedPClip, Path]:
    if options.checkpoint is not None:
        return load_checkpoint(options.checkpoint), options.checkpoint
    if options.config == "tiny" and (DEFAULT_CHECKPOINT / CONFIG).is_file():
        return load_checkpoint(DEFAULT_CHECKPOINT), DEFAULT_CHECKPOINT
    cfg = ModelConfig.load(options.config)
    directory = options.out / "checkpoint" / f"{cfg.name}-seed{options.seed}"
    if (directory / CONFIG).is_file():
        model = load_checkpoint(directory)
        if model.cfg == cfg:
            return model, directory
    model = build(cfg, seed=options.seed)
    save_checkpoint(model, directory, DEFAULT_TOKENIZER)
    log(f"  fresh '{cfg.name}' model (seed {options.seed}) saved to {directory}")
    return model, directory


def export(
    options: ExportOptions | None = None, log: Callable[[str], object] = print, **overrides
) -> ExportResult:
    """Checkpoint -> ONNX (cached) -> parity -> [int8 | TensorRT engines] -> repository.

    `overrides` replace fields of `options` (`export(out=tmp, skip_parity=True)`). Progress
    goes to `log`, one line per step; ExportError when the result would not serve correctly."""
    o = options or ExportOptions()
    if overrides:
        o = ExportOptions(**{**{f.name: getattr(o, f.name) for f in fields(o)}, **overrides})
    if o.flavour not in repository.FLAVOURS:
        raise ExportError(f"unknown flavour {o.flavour!r}; available: {repository.FLAVOURS}")
    start = time.perf_counter()
    log("[1/4] model")
    try:
        model, checkpoint = resolve_checkpoint(o, log)
    except (FileNotFoundError, ValueError) as exc:
        raise ExportError(str(exc)) from exc
    n = sum(p.numel() for p in model.parameters())
    log(f"  '{model.cfg.name}' from {checkpoint} ({n / 1e6:.2f} M parameters)")
    onnx_dir = o.out / "onnx"
    result = ExportResult(o.out / "model_repository", checkpoint, onnx_dir, model.cfg.name, n)

    log("[2/4] ONNX export")
    for name, ex in onnx_export.EXPORTABLES.items():
        key = onnx_export.cache_key(checkpoint, ex.spec)
        onnx_export.export_onnx(model, name, onnx_dir / f"{name}.onnx", key, log)

    if o.skip_parity:
        log("[3/4] parity: skipped")
    else:
        _parity(model, checkpoint, onnx_dir, result, log)
    if o.int8:
        log("[3a] int8 quantisation (ONNX Runtime, dynamic)")
        from .int8 import check_int8

        for name in onnx_export.INT8_MODELS:
            onnx_export.quantize_int8(onnx_dir / f"{name}.onnx", log)
        int8_check = check_int8(model, onnx_dir, checkpoint / "tokenizer.json", log)
        result.int8_cosine = min(c.value for _, c in int8_check.checks if c.kind == "cosine")
        failed = [f"{m} {c}" for m, c in int8_check.checks if not c.ok]
        if failed:
            raise ExportError(
                f"int8 drifts from fp32 on this CPU ({cpu.isa()}): {'; '.join(failed)}"
            )
    engines = o.engines or o.out / "engines"
    if o.flavour == "tensorrt":
        log(f"[3b] TensorRT engines ({o.precision}) in {engines}")
        _engines(model, onnx_dir, engines, o.precision)
        if o.skip_parity:
            log("[3c] TensorRT parity: skipped (--skip-parity); the engines are NOT checked")
        else:
            _engine_parity(model, checkpoint, onnx_dir, engines, log)

    log("[4/4] Triton model repository")
    try:
        repository.generate(
            result.repository,
            onnx_dir,
            checkpoint,
            flavour=o.flavour,
            ort_threads=o.ort_threads,
            instances=o.instances,
            queue_delay_us=o.queue_delay_us,
            engines_dir=engines,
            precision=o.precision,
            int8=o.int8,
            log=log,
        )
    except trt_engine.EngineError as exc:
        raise ExportError(str(exc)) from exc
    if o.int8:
        from .int8 import write_canaries

        n = write_canaries(int8_check, result.repository)
        log(f"  int8 canaries: {n} (each int8 encoder checks itself on the CPU it loads on)")
    result.seconds = time.perf_counter() - start
    log(f"done in {result.seconds:.1f} s")
    return result


def _parity(
    model: MedPClip,
    checkpoint: Path,
    onnx_dir: Path,
    result: ExportResult,
    log: Callable[[str], object],
) -> None:
    limit = onnx_export.PARITY_ATOL
    log(f"[3/4] parity, ONNX Runtime vs PyTorch (fp32, max |diff|, limit {limit:g})")
    real = real_inputs(model, checkpoint / "tokenizer.json")
    ok = True
    for name, ex in onnx_export.EXPORTABLES.items():
        path = onnx_dir / f"{name}.onnx"
        worst_by_kind = []
        for kind, inputs in (("random", ex.sample_inputs(model.cfg)), ("real", real[name])):
            diffs = onnx_export.parity(model, name, path, inputs)
            worst = max(diffs.values())
            worst_by_kind.append(worst)
            ok &= worst <= limit
            detail = ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
            flag = "ok" if worst <= limit else "FAIL"
            log(f"  {name:15s} {kind:6s} {worst:.2e} {flag}  ({detail})")
        result.parity[name] = (worst_by_kind[0], worst_by_kind[1])
    if not ok:
        raise ExportError("ONNX Runtime differs from PyTorch beyond the limit")


def _engines(model: MedPClip, onnx_dir: Path, engines: Path, precision: str) -> None:
    try:
        for spec in T.ENCODERS:
            trt_engine.build_engine(
                onnx_dir / f"{spec.name}.onnx", engines / spec.name, spec, model.cfg.dims, precision
            )
    except trt_engine.EngineError as exc:
        for spec in T.ENCODERS:  # the by-hand route still works from here
            trt_engine.write_trtexec_script(
                onnx_dir / f"{spec.name}.onnx",
                engines / spec.name,
                trt_engine.profile(spec, model.cfg.dims),
                precision,
            )
        raise ExportError(str(exc)) from exc


def _engine_parity(
    model: MedPClip,
    checkpoint: Path,
    onnx_dir: Path,
    engines: Path,
    log: Callable[[str], object],
) -> None:
    """No repository serves engines that differ from ONNX Runtime: each engine built for this GPU
    runs the random and real inputs of the ONNX parity check (tensorrt_parity's limits)."""
    from . import tensorrt_parity

    log(
        f"[3c] TensorRT parity, engines vs ONNX Runtime (cosine >= {tensorrt_parity.COSINE_MIN} "
        f"per row, |diff| <= {tensorrt_parity.SCALAR_ATOL:g} for scalars)"
    )
    feeds = {
        "random": {n: ex.sample_inputs(model.cfg) for n, ex in onnx_export.EXPORTABLES.items()},
        "real": real_inputs(model, checkpoint / "tokenizer.json"),
    }
    try:
        _, cc = trt_engine.gpu_identity()
        checks = tensorrt_parity.check_engines(engines, onnx_dir, feeds, log=log)
    except trt_engine.EngineError as exc:
        raise ExportError(str(exc)) from exc
    failed = [c for c in checks if not c.ok]
    if failed:
        # without its metadata the generator refuses the plan and the next export rebuilds it;
        # the plan stays for `python -m medpclip_tools.tensorrt_parity` to look at
        for name in sorted({c.model for c in failed}):
            (engines / name / trt_engine.engine_name(cc)).with_suffix(".json").unlink(
                missing_ok=True
            )
        raise ExportError(
            "TensorRT engines differ from ONNX Runtime beyond the limits ("
            + "; ".join(f"{c.model}.{c.output} {c.inputs} {c.kind} {c.value:.4g}" for c in failed)
            + "); no repository written. Inspect with python -m medpclip_tools.tensorrt_parity, "
            "or build full-precision engines with --precision fp32"
        )


def options_from_args(args: argparse.Namespace) -> ExportOptions:
    return ExportOptions(**{f.name: getattr(args, f.name) for f in fields(ExportOptions)})


def main(argv: list[str] | None = None) -> int:
    """The CLI: exit 0 with a repository, 1 when the export refused (message on stderr)."""
    args = parse_args(argv)
    try:
        export(options_from_args(args))
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
