"""Generate the Triton model repository from the tensor declarations.

One generator, two outputs:

- the committable part (`source_files`): every model's `config.pbtxt`, written through Triton's
  own protobuf (`model_config_pb2`) so an invalid field cannot be written, every python-backend
  model's `1/model.py` (a short import of its code from `medpclip_core.backend`), and a
  `.gitkeep` in each ensemble's (otherwise empty) version folder. Generated for the embedded
  default model with default options, it is the committed `model_repository/` of a checkout:

      python -m medpclip.repository           # rewrite ./model_repository
      python -m medpclip.repository --check   # exit 1 naming every stale file

- the served copy (`generate`, called by `python -m medpclip.export`): the same files for the
  exported checkpoint and options, plus what cannot be committed: each encoder's `model.onnx`
  (or, in the tensorrt flavour, its plans and a `tensorrt_plan` config naming them), the
  checkpoint's `tokenizer.json`, and `medpclip.json` (what was exported).

The ensembles, preprocessing and postprocessing do not depend on the flavour; only the
encoders (`tensors.ENCODERS`) do.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import shutil
import sys
import textwrap
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from medpclip_core import tensors as T

from . import tensorrt_engine as trt_engine
from .config import DEFAULT_CHECKPOINT, ModelConfig
from .model import TOKENIZER
from .onnx_export import INT8_MODELS

# python-backend model -> the medpclip_core.backend module holding its code
BACKEND_MODULES = {
    **{spec.name: "onnx_runner" for spec in T.ENCODERS},
    **{spec.name: spec.name for spec in T.PYTHON_MODELS},
}
# onnxruntime: each encoder is a python-backend model running ONNX Runtime (CPU; the bundled
# Triton has no onnxruntime backend). tensorrt: each encoder is a TensorRT plan on the GPU.
FLAVOURS = ("onnxruntime", "tensorrt")
# Image encoder shapes are all static: CUDA graphs for every batch size pay off there.
CUDA_GRAPH_MODELS = ("image_encoder", "image_trunk", "image_prompted")
# Label sets repeat (every request of a PACS integration sends the same list): the text encoder
# answers a repeated set from Triton's response cache (bounded by the server flag --cache-config,
# medpclip_tools.deployment.RESPONSE_CACHE_BYTES). Caching the composing model, not an
# ensemble, serves every ensemble that takes LABELS (medp_clip too) from one entry per set.
CACHED_MODELS = ("text_encoder",)
ENCODER_NAMES = tuple(spec.name for spec in T.ENCODERS)
# Models whose version folder holds the checkpoint's tokenizer (added by the export).
TOKENIZER_MODELS = ("tokenizer", "preprocess", "prompt_preprocess")
# Files of the committed folder that the generator does not write (and never removes).
HAND_WRITTEN = ("README.md",)
# Git keeps no empty folder; Triton needs an ensemble's version folder and ignores its files.
KEEP_FILE = ".gitkeep"
# The served copy's record of what was exported (config, flavour, int8, logit_scale).
EXPORT_RECORD = "medpclip.json"
# Model identity (`model_identity`): parameters of every ensemble's config (what clients call),
# so that clients (the PACS bridge's DICOM objects) can name the model, config, weights and
# package that answered, as the server states them. The medpclip gateway lets a caller with the
# API key alone read an ensemble's config (an admin method otherwise), so a PACS integration
# needs no admin key. `postprocess`, the step every scoring ensemble ends with, carries them too
# (for the admin's view of the composing models); all of them from one `model_identity` dict.
MODEL_NAME = "MedP-CLIP"
IDENTITY_KEYS = ("model_name", "model_config", "checkpoint_sha256", "medpclip_version")
REGENERATE = "python -m medpclip.repository"
HEADER = f"# Generated from medpclip_core.tensors by {REGENERATE}: do not edit.\n"


def _tensor(t: T.Tensor, dims: T.Dims, kind: type) -> object:
    msg = kind(name=t.name, data_type=mc.DataType.Value(t.triton_type), dims=t.dims(dims))
    if t.optional and kind is mc.ModelInput:
        msg.optional = True
    return msg


def model_config(
    spec: T.ModelSpec,
    dims: T.Dims,
    parameters: dict[str, object] | None = None,
    instances: int = 1,
    queue_delay_us: int = 2000,
) -> mc.ModelConfig:
    cfg = mc.ModelConfig(name=spec.name, max_batch_size=spec.max_batch_size)
    cfg.input.extend(_tensor(t, dims, mc.ModelInput) for t in spec.inputs)
    cfg.output.extend(_tensor(t, dims, mc.ModelOutput) for t in spec.outputs)
    for k, v in {**spec.parameters, **(parameters or {})}.items():
        cfg.parameters[k].string_value = str(v)
    if isinstance(spec, T.EnsembleSpec):
        cfg.platform = "ensemble"
        for step in spec.steps:
            cfg.ensemble_scheduling.step.add(
                model_name=step.model,
                model_version=-1,
                input_map=step.input_map,
                output_map=step.output_map,
            )
        return cfg
    cfg.backend = "python"
    cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=instances)
    _batching(cfg, spec, queue_delay_us)
    return cfg


def _batching(cfg: mc.ModelConfig, spec: T.ModelSpec, queue_delay_us: int = 2000) -> None:
    if spec.max_batch_size > 0:
        # Batch what arrives together; a short delay lets concurrent requests meet.
        cfg.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
    if spec.name in CACHED_MODELS:
        cfg.response_cache.enable = True


def tensorrt_config(spec: T.ModelSpec, dims: T.Dims, engines: dict[str, str]) -> mc.ModelConfig:
    """A `tensorrt_plan` encoder on the GPU; `engines` maps compute capability -> plan file."""
    cfg = mc.ModelConfig(name=spec.name, max_batch_size=spec.max_batch_size)
    cfg.platform = "tensorrt_plan"
    cfg.input.extend(_tensor(t, dims, mc.ModelInput) for t in spec.inputs)
    cfg.output.extend(_tensor(t, dims, mc.ModelOutput) for t in spec.outputs)
    cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=1)
    for cc, filename in sorted(engines.items()):
        cfg.cc_model_filenames[cc] = filename
    _batching(cfg, spec)
    prof = trt_engine.profile(spec, dims)
    warmup = cfg.model_warmup.add(name=f"{spec.name}_warmup", batch_size=1)
    for t in spec.inputs:
        shape = list(prof.shapes[t.name][1][1:])  # the profile's opt shape, without batch
        inp = warmup.inputs[t.name]
        inp.data_type = mc.DataType.Value(t.triton_type)
        inp.dims.extend(shape)
        if t.dtype == "float32":
            inp.random_data = True
        else:
            inp.zero_data = True  # ids and labels must stay valid indices
    if spec.name in CUDA_GRAPH_MODELS:
        cfg.optimization.cuda.graphs = True
        for b in range(1, spec.max_batch_size + 1):
            cfg.optimization.cuda.graph_spec.add(batch_size=b)
    return cfg


def collect_engines(
    spec: T.ModelSpec, engines_dir: Path, onnx: Path, precision: str
) -> dict[str, Path]:
    """compute capability -> plan of every checked engine for `spec` (EngineError if none or
    if one does not belong to this ONNX, precision and Triton's TensorRT)."""
    found: dict[str, Path] = {}
    for meta_path in sorted((engines_dir / spec.name).glob("model.sm*.json")):
        meta = trt_engine.EngineMeta.read(meta_path)
        trt_engine.check_engine(meta, onnx, precision)
        plan = meta_path.with_suffix(".plan")
        if not plan.is_file():
            raise trt_engine.EngineError(f"{meta_path} has no plan beside it ({plan.name})")
        found[meta.compute_capability] = plan
    if not found:
        raise trt_engine.EngineError(
            f"no TensorRT engine for {spec.name} in {engines_dir / spec.name}: build it on the "
            "target GPU with python -m medpclip.export --flavour tensorrt"
        )
    return found


def config_text(cfg: mc.ModelConfig) -> str:
    """A config.pbtxt: the generated-file header and the protobuf's text format."""
    return HEADER + text_format.MessageToString(cfg)


def model_source(spec: T.ModelSpec) -> str:
    """The `1/model.py` of a python-backend model: its description from the declaration and
    the import of its code from `medpclip_core.backend` (installed in the serving image)."""
    module = BACKEND_MODULES[spec.name]
    doc = spec.doc
    if module == "onnx_runner":
        doc += " Runs model.onnx (added by the export) with ONNX Runtime on CPU."
    return (
        textwrap.fill(f'"""{spec.name}: {doc}', width=100)
        + f"\n\nCode: medpclip_core.backend.{module}.\nGenerated by {REGENERATE}: do not edit.\n"
        + '"""\n\n'
        + f"from medpclip_core.backend.{module} import TritonPythonModel  # noqa: F401\n"
    )


def checkpoint_digest(checkpoint: Path) -> str:
    """SHA-256 (hex) of the checkpoint's weights file: the same weights give the same digest
    in every export, other weights another one (config and tokenizer are named separately)."""
    h = hashlib.sha256()
    with open(checkpoint / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_identity(checkpoint: Path, cfg: ModelConfig | None = None) -> dict[str, str]:
    """What the served repository says about the model it serves (`IDENTITY_KEYS`): the model's
    name, the checkpoint's config name, the weights' SHA-256 and the medpclip package version
    that exported it."""
    if cfg is None:
        cfg = read_checkpoint(checkpoint)[0]
    return {
        "model_name": MODEL_NAME,
        "model_config": cfg.name,
        "checkpoint_sha256": checkpoint_digest(checkpoint),
        "medpclip_version": importlib.metadata.version("medpclip"),
    }


def read_checkpoint(checkpoint: Path) -> tuple[ModelConfig, float]:
    """What the generated files take from a checkpoint: its config and its logit scale."""
    cfg = ModelConfig.from_dict(json.loads((checkpoint / "config.json").read_text()))
    return cfg, _logit_scale(checkpoint)


def source_files(
    checkpoint: Path,
    ort_threads: int = 0,
    instances: int = 1,
    queue_delay_us: int = 2000,
) -> dict[str, str]:
    """The committable part of the repository for `checkpoint`: relative path -> text.

    Every config.pbtxt (the encoders in the onnxruntime flavour), every python-backend model's
    `1/model.py` and a `.gitkeep` in each ensemble's version folder. Depends on the checkpoint
    only through its dims, its logit scale (in postprocess's config) and its identity
    (`model_identity`, in postprocess's and every ensemble's config), and on the options only
    in the encoders' configs."""
    cfg, logit_scale = read_checkpoint(checkpoint)
    dims = cfg.dims
    identity = model_identity(checkpoint, cfg)
    params: dict[str, dict[str, object]] = {
        "preprocess": {
            "image_size": dims.S,
            "mask_side": dims.M,
            "max_image_side": T.MAX_IMAGE_SIDE,
            "context_length": dims.L,
            "max_labels": T.MAX_LABELS,
        },
        "prompt_preprocess": {
            "image_size": dims.S,
            "mask_side": dims.M,
            "max_image_side": T.MAX_IMAGE_SIDE,
            "context_length": dims.L,
            "max_labels": T.MAX_LABELS,
        },
        "tokenizer": {"context_length": dims.L, "max_labels": T.MAX_LABELS},
        "postprocess": {
            "image_size": dims.S,
            "logit_scale": f"{logit_scale:.8g}",
            **identity,
        },
        **{spec.name: dict(identity) for spec in T.ENSEMBLES},
    }
    files: dict[str, str] = {}
    for spec in T.ALL_MODELS:
        if spec.name in ENCODER_NAMES:
            ort = {"intra_op_threads": ort_threads}
            msg = model_config(spec, dims, ort, instances, queue_delay_us)
        elif spec.name in params:
            msg = model_config(spec, dims, params[spec.name])
        else:
            msg = model_config(spec, dims)
        files[f"{spec.name}/config.pbtxt"] = config_text(msg)
        if spec.name in BACKEND_MODULES:
            files[f"{spec.name}/1/model.py"] = model_source(spec)
        else:
            files[f"{spec.name}/1/{KEEP_FILE}"] = ""
    return files


def write_files(out: Path, files: dict[str, str], keep: set[str] = frozenset()) -> list[str]:
    """Write `files` (relative path -> text) under `out`, touching only those that change, and
    remove what else lies in a model's folder (another flavour's or an older declaration's
    files) unless `keep` names it. Returns the relative paths written or removed."""
    changed = []
    for name, text in files.items():
        if _write_text(out / name, text):
            changed.append(name)
    models = {d.name for d in out.iterdir() if _is_model_folder(d)}
    for name in sorted(_extra(out, {*files, *keep})):
        if "/" in name and name.split("/")[0] in models:
            (out / name).unlink()
            changed.append(name)
    for name in models - {spec.name for spec in T.ALL_MODELS}:  # no longer declared, now empty
        shutil.rmtree(out / name)
    return changed


def stale_files(out: Path, files: dict[str, str]) -> list[str]:
    """What makes `out` differ from `files`: one 'path (why)' per missing, differing or extra
    file (HAND_WRITTEN files and __pycache__ aside); empty when `out` is up to date."""
    stale = []
    for name, text in files.items():
        path = out / name
        if not path.is_file():
            stale.append(f"{name} (missing)")
        elif path.read_bytes() != text.encode():
            stale.append(f"{name} (differs)")
    stale += [f"{name} (not generated)" for name in sorted(_extra(out, set(files)))]
    return stale


def _extra(out: Path, expected: set[str]) -> set[str]:
    if not out.is_dir():
        return set()
    present = {
        p.relative_to(out).as_posix()
        for p in out.rglob("*")
        if p.is_file() and "__pycache__" not in p.relative_to(out).parts
    }
    return present - expected - set(HAND_WRITTEN)


def _is_model_folder(d: Path) -> bool:
    return d.is_dir() and (
        d.name in {spec.name for spec in T.ALL_MODELS} or (d / "config.pbtxt").is_file()
    )


def _write_text(path: Path, text: str) -> bool:
    """Write unless unchanged (a repository under polling must not see untouched files move)."""
    data = text.encode()
    if path.is_file() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return True


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if (
        dst.exists()
        and dst.stat().st_size == src.stat().st_size
        and dst.stat().st_mtime >= src.stat().st_mtime
    ):
        return  # idempotent and cheap for large ONNX files
    shutil.copy2(src, dst)


def generate(
    out: Path,
    onnx_dir: Path,
    checkpoint: Path,
    flavour: str = "onnxruntime",
    ort_threads: int = 0,
    instances: int = 1,
    queue_delay_us: int = 2000,
    engines_dir: Path | None = None,
    precision: str = "fp16",
    int8: bool = False,
    log=print,
) -> Path:
    """Write the served copy to `out` and return it: `source_files` plus the artifacts.

    The tensorrt flavour replaces each encoder's config and model.py by a `tensorrt_plan`
    config and the plans from `engines_dir`, refusing any that do not match (EngineError);
    `int8` serves the onnxruntime flavour's quantised encoders (`<name>.int8.onnx`, see
    onnx_export)."""
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown flavour {flavour!r}; available: {', '.join(FLAVOURS)}")
    cfg, logit_scale = read_checkpoint(checkpoint)
    files = source_files(checkpoint, ort_threads, instances, queue_delay_us)
    artifacts: dict[str, Path] = {}  # relative path -> source, copied as is
    for spec in T.ENCODERS:
        onnx = onnx_dir / f"{spec.name}.onnx"
        if flavour == "tensorrt":
            plans = collect_engines(spec, engines_dir or out.parent / "engines", onnx, precision)
            engines = {cc: p.name for cc, p in plans.items()}
            files[f"{spec.name}/config.pbtxt"] = config_text(
                tensorrt_config(spec, cfg.dims, engines)
            )
            del files[f"{spec.name}/1/model.py"]
            artifacts.update({f"{spec.name}/1/{p.name}": p for p in plans.values()})
        else:
            if int8 and spec.name in INT8_MODELS:
                onnx = onnx.with_suffix(".int8.onnx")
            artifacts[f"{spec.name}/1/model.onnx"] = onnx
    for name in TOKENIZER_MODELS:
        artifacts[f"{name}/1/{TOKENIZER}"] = checkpoint / TOKENIZER
    files[EXPORT_RECORD] = json.dumps(
        {
            "config": cfg.to_dict(),
            "flavour": flavour,
            "int8": int8,
            "logit_scale": logit_scale,
            "identity": model_identity(checkpoint, cfg),
        },
        indent=2,
    )
    write_files(out, files, keep=set(artifacts))
    for name, src in artifacts.items():
        _copy(src, out / name)
    log(f"  repository: {out} ({len(T.ALL_MODELS)} models, flavour {flavour})")
    return out


def _logit_scale(checkpoint: Path) -> float:
    from safetensors import safe_open

    with safe_open(str(checkpoint / "model.safetensors"), "np") as f:
        return float(np.exp(f.get_tensor("logit_scale")))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog=REGENERATE,
        description=(
            "Write (or check) the committable part of the Triton model repository: every "
            "model's config.pbtxt and every python-backend model's 1/model.py, generated from "
            "the tensor declarations (medpclip_core.tensors) for the embedded default model "
            "with default options. The export writes the served copy (build/model_repository) "
            "from the same generator and adds the ONNX files, TensorRT engines and tokenizer."
        ),
        epilog=(
            "Run it from the checkout's root after changing a declaration or the generator, "
            "and commit the result; `--check` is what the tests run."
        ),
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("model_repository"),
        help="the folder to write or check, relative to the working directory "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 naming every file that is missing, differs from the "
        "generator's output or is not generated (README.md aside)",
    )
    args = p.parse_args(argv)
    files = source_files(DEFAULT_CHECKPOINT)
    out: Path = args.out
    if args.check:
        stale = stale_files(out, files)
        if stale:
            command = REGENERATE + ("" if out == Path("model_repository") else f" --out {out}")
            print(f"{out} is stale: run {command}", file=sys.stderr)
            for line in stale:
                print(f"  {line}", file=sys.stderr)
            return 1
        print(f"{out} is up to date ({len(files)} generated files)")
        return 0
    changed = write_files(out, files)
    left = stale_files(out, files)  # files outside the models' folders
    for name in changed:
        print(f"  {name}")
    print(f"{out}: {len(changed)} of {len(files)} generated files changed")
    for line in left:
        print(f"  left alone: {line}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
