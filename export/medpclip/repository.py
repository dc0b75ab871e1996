"""Generate a Triton model repository from the tensor declarations.

Sources: the declarations (`medpclip_core.tensors`), the exported ONNX files and a checkpoint.
The python-backend models' code is `medpclip_core.backend`; each `1/model.py` imports it.
Output: a complete repository (config.pbtxt for every model, written through Triton's own
protobuf so an invalid field cannot be written). The ensembles, preprocessing and
postprocessing do not depend on the flavour; only the four encoders do.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from medpclip_core import tensors as T
from tritonclient.grpc import model_config_pb2 as mc

from . import tensorrt_engine as trt_engine
from .config import ModelConfig
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
CUDA_GRAPH_MODELS = ("image_encoder",)
# Label sets repeat (every request of a PACS integration sends the same list): answer a repeated
# set from Triton's response cache (enabled by the server flag --cache-config).
CACHED_MODELS = ("medp_clip_text",)


def _tensor(t: T.Tensor, dims: T.Dims, kind: type) -> object:
    msg = kind(name=t.name, data_type=mc.DataType.Value(t.triton_type), dims=t.dims(dims))
    if t.optional and kind is mc.ModelInput:
        msg.optional = True
    return msg


def model_config(
    spec: T.ModelSpec,
    dims: T.Dims,
    parameters: dict[str, str] | None = None,
    instances: int = 1,
    queue_delay_us: int = 2000,
) -> mc.ModelConfig:
    cfg = mc.ModelConfig(name=spec.name, max_batch_size=spec.max_batch_size)
    cfg.input.extend(_tensor(t, dims, mc.ModelInput) for t in spec.inputs)
    cfg.output.extend(_tensor(t, dims, mc.ModelOutput) for t in spec.outputs)
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
    for k, v in {**spec.parameters, **(parameters or {})}.items():
        cfg.parameters[k].string_value = str(v)
    return cfg


def _batching(cfg: mc.ModelConfig, spec: T.ModelSpec, queue_delay_us: int = 2000) -> None:
    if spec.max_batch_size > 0:
        # Batch what arrives together; a short delay lets concurrent requests meet.
        cfg.dynamic_batching.max_queue_delay_microseconds = queue_delay_us


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


def write_config(cfg: mc.ModelConfig, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.pbtxt"
    path.write_text(text_format.MessageToString(cfg))
    return path


def model_source(spec: T.ModelSpec) -> str:
    """The `1/model.py` of a python-backend model: its description from the declaration and
    the import of its code from `medpclip_core.backend` (installed in the serving image)."""
    module = BACKEND_MODULES[spec.name]
    doc = spec.doc
    if module == "onnx_runner":
        doc += " Runs model.onnx (added by the export) with ONNX Runtime on CPU."
    return (
        f'"""{spec.name}: {doc}\n\nCode: medpclip_core.backend.{module} (generated by '
        'medpclip.repository; do not edit)."""\n\n'
        f"from medpclip_core.backend.{module} import TritonPythonModel  # noqa: F401\n"
    )


def write_model_source(spec: T.ModelSpec, directory: Path) -> Path:
    path = directory / "1" / "model.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = model_source(spec)
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return path


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
    """Write the complete repository to `out` and return it. The tensorrt flavour takes its
    plans from `engines_dir` and refuses any that do not match (EngineError); `int8` serves the
    onnxruntime flavour's quantised encoders (`<name>.int8.onnx`, see onnx_export)."""
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown flavour {flavour!r}; available: {', '.join(FLAVOURS)}")
    cfg = ModelConfig.from_dict(json.loads((checkpoint / "config.json").read_text()))
    dims = cfg.dims
    logit_scale = _logit_scale(checkpoint)
    params = {
        "preprocess": {
            "image_size": dims.S,
            "mask_side": dims.M,
            "max_image_side": T.MAX_IMAGE_SIDE,
            "context_length": dims.L,
            "max_labels": T.MAX_LABELS,
        },
        "tokenizer": {"context_length": dims.L, "max_labels": T.MAX_LABELS},
        "postprocess": {"image_size": dims.S, "logit_scale": f"{logit_scale:.8g}"},
    }
    for spec in T.ENCODERS:
        d = out / spec.name
        onnx = onnx_dir / f"{spec.name}.onnx"
        if flavour == "tensorrt":
            plans = collect_engines(spec, engines_dir or out.parent / "engines", onnx, precision)
            write_config(tensorrt_config(spec, dims, {cc: p.name for cc, p in plans.items()}), d)
            files = {p.name: p for p in plans.values()}
        else:
            ort = {"intra_op_threads": ort_threads}
            write_config(model_config(spec, dims, ort, instances, queue_delay_us), d)
            if int8 and spec.name in INT8_MODELS:
                onnx = onnx.with_suffix(".int8.onnx")
            files = {"model.onnx": onnx}
            write_model_source(spec, d)
        for name, src in files.items():
            _copy(src, d / "1" / name)
        keep = {*files, "model.py"} if flavour != "tensorrt" else set(files)
        for stale in (d / "1").iterdir():  # what another flavour left behind
            if stale.is_file() and stale.name not in keep:
                stale.unlink()
    for spec in T.PYTHON_MODELS:
        d = out / spec.name
        write_config(model_config(spec, dims, params[spec.name]), d)
        write_model_source(spec, d)
    for name in ("tokenizer", "preprocess"):
        _copy(checkpoint / TOKENIZER, out / name / "1" / TOKENIZER)
    for spec in T.ENSEMBLES:
        d = out / spec.name
        cfg_msg = model_config(spec, dims)
        if spec.name in CACHED_MODELS:
            cfg_msg.response_cache.enable = True
        write_config(cfg_msg, d)
        (d / "1").mkdir(exist_ok=True)  # an ensemble still needs a version folder
    (out / "medpclip.json").write_text(
        json.dumps(
            {"config": cfg.to_dict(), "flavour": flavour, "int8": int8, "logit_scale": logit_scale},
            indent=2,
        )
    )
    log(f"  repository: {out} ({len(T.ALL_MODELS)} models, flavour {flavour})")
    return out


def _logit_scale(checkpoint: Path) -> float:
    from safetensors import safe_open

    with safe_open(str(checkpoint / "model.safetensors"), "np") as f:
        return float(np.exp(f.get_tensor("logit_scale")))
