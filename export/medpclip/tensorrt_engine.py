"""TensorRT engines for the exported models: profiles, trtexec lines, build and metadata.

Everything shape-related comes from the tensor declarations (`medpclip_core.tensors`): the
optimisation profile of each input is (min 1, opt, max = the Triton config's max_batch_size) on
the batch axis and the declared bounds on dynamic axes, one profile per engine, so the engine
accepts exactly what Triton's dynamic batcher may send.

Engines are GPU-specific. Each `model.sm<cc>.plan` carries a JSON beside it (TensorRT version,
GPU name, compute capability, precision, the layers kept in FP32, workspace, profile shapes,
sha256 of the ONNX it came from) and a `.trtexec.sh` with the same build by hand: the same
profile, flags and FP32 layers (`tensorrt_precision`, one decision for both).

Version: a plan loads only in the TensorRT version that built it, to the build number (TensorRT
documentation, "Version Compatibility": "By default, TensorRT engines are compatible only with
the version of TensorRT used to build them"; Triton refuses plans whose patch or build differs,
e.g. server#317 "expecting library version 5.1.2 got 5.1.5", pytorch/TensorRT#1059). Engines are
therefore built, and checked, for the full version of Triton's TensorRT (`ngc_images`). The
alternative, version-compatible engines (BuilderFlag.VERSION_COMPATIBLE, loaded by Triton with
`--backend-config=tensorrt,version-compatible=true`, tensorrt_backend r25.06 README and
src/loader.cc), embeds a lean runtime that Triton must trust to run host code, "can be slower
than engines built for a specific runtime version", and only helps when the build and serve
images differ, which ours never do: both come from one NGC release (`ngc_images`, checked by
the tests). So: exact version, no host code in plans, rebuild on a release move.

The builder uses the TensorRT Python API; it runs where `import tensorrt` works (NVIDIA's
TensorRT/PyTorch containers on the target GPU). Nothing here simulates TensorRT.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from medpclip_core import tensors as T

from . import tensorrt_precision
from .ngc_images import NGC_RELEASE, TRITON_TENSORRT

PRECISIONS = ("fp16", "fp32")
# The NGC release every image uses (deploy/docker, one place: ngc_images): Triton 25.06 (2.59)
# is the first with all three gRPC cancellation fixes (server#7840 in 24.12, #8078 for #8034 in
# 25.04, #8220 in 25.06) and still on CUDA 12.9. TRITON_TENSORRT is its full TensorRT version
# (major.minor.patch.build), the one a plan must be built by.
TRITON_RELEASE = NGC_RELEASE
WORKSPACE_BYTES = 4 << 30


class EngineError(RuntimeError):
    """An engine that cannot be built or used here; the message says what to do."""


@dataclass(frozen=True)
class Profile:
    """(min, opt, max) full shapes (batch axis included) per input name."""

    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


def profile(spec: T.ModelSpec, dims: T.Dims) -> Profile:
    if spec.max_batch_size < 1:
        raise ValueError(f"{spec.name} is not batched; TensorRT profiles need a batch axis")
    opt_batch = min(T.OPT_BATCH.get(spec.name, 1), spec.max_batch_size)
    shapes = {}
    for t in spec.inputs:
        lo, mid, hi = [1], [opt_batch], [spec.max_batch_size]
        for d, symbol in zip(t.dims(dims), t.shape, strict=True):
            if d >= 0:
                lo.append(d), mid.append(d), hi.append(d)
            elif symbol in T.DYNAMIC_BOUNDS:
                a, b, c = T.bounds(symbol, dims)
                lo.append(a), mid.append(b), hi.append(c)
            else:
                raise ValueError(f"{spec.name}.{t.name}: no bounds for dynamic axis {symbol!r}")
        shapes[t.name] = (tuple(lo), tuple(mid), tuple(hi))
    return Profile(shapes)


def fp32_layers(onnx_path: Path) -> list[str]:
    """The TensorRT layers an FP16 engine keeps in FP32 (`tensorrt_precision`): the one list
    both the Python builder and the trtexec script pin."""
    return tensorrt_precision.select_file(onnx_path).names


def engine_name(compute_capability: str) -> str:
    """`8.9` -> `model.sm89.plan` (one engine per GPU architecture)."""
    return f"model.sm{compute_capability.replace('.', '')}.plan"


def trtexec_command(
    onnx_path: Path,
    engine: Path,
    prof: Profile,
    precision: str,
    timing_cache: Path,
    fp32: list[str] | None = None,
) -> list[str]:
    def shapes(i: int) -> str:
        return ",".join(f"{n}:{'x'.join(map(str, s[i]))}" for n, s in prof.shapes.items())

    cmd = [
        "trtexec",
        f"--onnx={onnx_path}",
        f"--saveEngine={engine}",
        f"--minShapes={shapes(0)}",
        f"--optShapes={shapes(1)}",
        f"--maxShapes={shapes(2)}",
        f"--timingCacheFile={timing_cache}",
        f"--memPoolSize=workspace:{WORKSPACE_BYTES >> 20}M",
    ]
    if precision == "fp16":
        cmd += ["--fp16", "--precisionConstraints=obey"]
        if fp32:  # as the Python builder: the layer's precision and its output type
            cmd.append("--layerPrecisions=" + ",".join(f"{n}:fp32" for n in fp32))
            cmd.append("--layerOutputTypes=" + ",".join(f"{n}:fp32" for n in fp32))
    return cmd + ["--skipInference"]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class EngineMeta:
    model: str
    tensorrt: str  # full version, e.g. 10.11.0.33: a plan loads in exactly this one
    gpu: str
    compute_capability: str
    precision: str
    profile: dict
    onnx_sha256: str
    built: str = ""
    fp32_layers: list[str] = field(default_factory=list)  # empty in fp32 engines
    workspace_bytes: int = 0

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, path: Path) -> EngineMeta:
        # keys this version does not know are ignored; missing ones take their defaults, so a
        # metadata file from an older export reads (and then fails the reuse checks by itself)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in json.loads(path.read_text()).items() if k in known})


def check_engine(
    meta: EngineMeta, onnx_path: Path, precision: str, tensorrt: str = TRITON_TENSORRT
) -> None:
    """Raise EngineError when the engine does not belong to this ONNX/precision/TensorRT."""
    problems = []
    if meta.onnx_sha256 != sha256(onnx_path):
        problems.append(f"it was built from another ONNX (sha256 {meta.onnx_sha256[:12]})")
    if meta.precision != precision:
        problems.append(f"it is {meta.precision}, {precision} was asked for")
    if meta.tensorrt != tensorrt:
        problems.append(
            f"it was built by TensorRT {meta.tensorrt}; Triton {TRITON_RELEASE} "
            f"loads plans of TensorRT {tensorrt} only"
        )
    if problems:
        raise EngineError(
            f"{meta.model} engine for {meta.gpu} (sm {meta.compute_capability}): "
            + "; ".join(problems)
            + ". Rebuild it on that GPU: python -m medpclip.export --flavour tensorrt "
            "(or run the .trtexec.sh beside it)"
        )


def stale_reason(
    meta: EngineMeta,
    onnx_path: Path,
    precision: str,
    tensorrt: str,
    gpu: str,
    profile_doc: dict,
    fp32: list[str],
) -> str | None:
    """Why an existing engine cannot be reused for this build, or None when it can: everything
    the build depends on must match, not only what Triton checks."""
    try:
        check_engine(meta, onnx_path, precision, tensorrt)
    except EngineError as exc:
        return str(exc)
    for what, have, want in (
        ("GPU", meta.gpu, gpu),
        ("profile", meta.profile, profile_doc),
        ("FP32 layers", meta.fp32_layers, fp32),
        ("workspace", meta.workspace_bytes, WORKSPACE_BYTES),
    ):
        if have != want:
            return f"built with another {what}"
    return None


def gpu_identity() -> tuple[str, str]:
    """(name, compute capability) of the GPU TensorRT builds on here: CUDA device 0 of those
    CUDA_VISIBLE_DEVICES leaves, from its CUDA device properties, the numbers Triton's TensorRT
    backend reads to choose a plan from cc_model_filenames (tensorrt_backend model_state.cc,
    cudaGetDeviceProperties). nvidia-smi would count every GPU and ignore CUDA_VISIBLE_DEVICES."""
    import torch  # the export's own dependency; it asks the CUDA runtime, as TensorRT does

    if not torch.cuda.is_available():
        raise EngineError(
            "no CUDA device visible (torch.cuda.is_available() is False; check the driver, "
            "CUDA_VISIBLE_DEVICES and that the container has a GPU, e.g. compose's "
            "`deploy.resources.reservations.devices`); TensorRT engines are built on the GPU "
            "that will run them"
        )
    props = torch.cuda.get_device_properties(0)
    return props.name, f"{props.major}.{props.minor}"


def timing_cache_name(compute_capability: str) -> str:
    """Timing caches are device-specific: one per GPU architecture."""
    return f"timing.sm{compute_capability.replace('.', '')}.cache"


def build_engine(
    onnx_path: Path,
    out_dir: Path,
    spec: T.ModelSpec,
    dims: T.Dims,
    precision: str = "fp16",
    timing_cache: Path | None = None,
    log=print,
) -> Path:
    """Build (or reuse) the engine of one model for this GPU with the TensorRT Python API."""
    try:
        import tensorrt as trt
    except ImportError:
        raise EngineError(
            "TensorRT is not installed here: build engines in NVIDIA's TensorRT or PyTorch "
            f"container {TRITON_RELEASE} on the target GPU (docker compose up export), or run "
            f"the .trtexec.sh written in {out_dir}"
        ) from None
    if trt.__version__ != TRITON_TENSORRT:
        raise EngineError(
            f"TensorRT {trt.__version__} is installed here, but Triton {TRITON_RELEASE} loads "
            f"plans of TensorRT {TRITON_TENSORRT} only: build in the {TRITON_RELEASE} containers "
            "(or, if those carry another TensorRT, correct medpclip/ngc_images.py)"
        )
    gpu, cc = gpu_identity()
    engine = out_dir / engine_name(cc)
    meta_path = engine.with_suffix(".json")
    prof = profile(spec, dims)
    profile_doc = json.loads(json.dumps({k: list(v) for k, v in prof.shapes.items()}))
    selection = tensorrt_precision.select_file(onnx_path)
    fp32 = selection.names if precision == "fp16" else []
    timing_cache = timing_cache or out_dir.parent / timing_cache_name(cc)
    write_trtexec_script(onnx_path, out_dir, prof, precision)
    if engine.is_file() and meta_path.is_file():
        meta = EngineMeta.read(meta_path)
        why = stale_reason(meta, onnx_path, precision, trt.__version__, gpu, profile_doc, fp32)
        if why is None:
            log(f"  {spec.name}: engine up to date ({engine.name}, {gpu}), reusing")
            return engine
        log(f"  {spec.name}: rebuilding {engine.name}: {why}")
    start = time.perf_counter()
    log(f"  {spec.name}: building {precision} engine for {gpu} (sm {cc}) ...")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"{spec.name}: TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pinned, missing = _keep_fp32(trt, network, fp32, spec.name)
        # the count is the check that the names still reach layers (a silent no-op otherwise)
        log(f"  {spec.name}: pinned {len(pinned)}/{len(fp32)} to FP32 ({selection.summary()})")
        if missing:
            log(
                f"  {spec.name}: WARNING {len(missing)} FP32 layer name(s) match no TensorRT "
                f"layer, they run in FP16: {', '.join(missing[:5])}"
            )
    p = builder.create_optimization_profile()
    for name, (lo, opt, hi) in prof.shapes.items():
        p.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(p)
    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
    if not config.set_timing_cache(config.create_timing_cache(cache_bytes), ignore_mismatch=False):
        log(f"  {spec.name}: timing cache {timing_cache.name} rejected, starting a new one")
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"{spec.name}: TensorRT failed to build an engine (see its log above)")
    out_dir.mkdir(parents=True, exist_ok=True)
    engine.write_bytes(bytes(serialized))
    cache = config.get_timing_cache()
    if cache is not None:
        timing_cache.write_bytes(bytes(cache.serialize()))
    EngineMeta(
        model=spec.name,
        tensorrt=trt.__version__,
        gpu=gpu,
        compute_capability=cc,
        precision=precision,
        profile=profile_doc,
        onnx_sha256=sha256(onnx_path),
        built=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        fp32_layers=fp32,
        workspace_bytes=WORKSPACE_BYTES,
    ).write(meta_path)
    log(f"  {spec.name}: built in {time.perf_counter() - start:.0f} s -> {engine}")
    return engine


def _keep_fp32(trt, network, names: list[str], model: str) -> tuple[list[str], list[str]]:
    """Pin the named layers to FP32 (precision and float outputs), by exact name as trtexec's
    --layerPrecisions does; return (pinned, names that matched no layer)."""
    wanted = set(names)
    floats = (trt.DataType.FLOAT, trt.DataType.HALF, trt.DataType.BF16)
    pinned, integer = [], []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.name not in wanted:
            continue
        inputs = [layer.get_input(j) for j in range(layer.num_inputs)]
        if any(t is not None and t.dtype not in floats for t in inputs):
            integer.append(layer.name)
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            if layer.get_output(j).dtype in floats:
                layer.set_output_type(j, trt.float32)
        pinned.append(layer.name)
    if integer:
        # trtexec would pin these too (exact names) and fail under obey: the ONNX selection
        # and TensorRT disagree about a type, which must be fixed, not papered over here
        raise EngineError(
            f"{model}: layers selected for FP32 have non-float inputs in TensorRT: "
            f"{', '.join(integer[:5])}; fix medpclip/tensorrt_precision.py's selection"
        )
    return pinned, sorted(wanted - set(pinned))


def write_trtexec_script(onnx_path: Path, out_dir: Path, prof: Profile, precision: str) -> Path:
    """`<out_dir>/model.trtexec.sh`: the same build by hand, for operators. It names the engine
    and the timing cache after the GPU it runs on, like the Python builder (it writes no
    metadata: the repository generator takes only engines our builder made)."""
    fp32 = fp32_layers(onnx_path) if precision == "fp16" else None
    cmd = trtexec_command(onnx_path.resolve(), Path("ENGINE"), prof, precision, Path("CACHE"), fp32)
    shell = {
        "trtexec": '"$TRTEXEC"',
        "--saveEngine=ENGINE": '"--saveEngine=$DIR/model.sm${CC}.plan"',
        "--timingCacheFile=CACHE": '"--timingCacheFile=$DIR/../timing.sm${CC}.cache"',
    }
    lines = [shell.get(c, shlex.quote(c)) for c in cmd]
    script = out_dir / "model.trtexec.sh"
    out_dir.mkdir(parents=True, exist_ok=True)
    script.write_text(
        "#!/bin/sh\n"
        f"# Rebuild this engine by hand on the target GPU, with TensorRT {TRITON_TENSORRT} "
        f"(as in Triton {TRITON_RELEASE}).\n"
        f"# {len(fp32 or [])} layers kept in FP32 (medpclip/tensorrt_precision.py, as the Python "
        "builder); trtexec logs each 'Set layer ... to precision'.\n"
        "set -e\n"
        'DIR=$(cd "$(dirname "$0")" && pwd)\n'
        "# trtexec builds on CUDA device 0 of CUDA_VISIBLE_DEVICES; number devices by PCI bus, as\n"
        "# nvidia-smi does, so that both name the same GPU. CC=89 (say) skips the query.\n"
        "export CUDA_DEVICE_ORDER=PCI_BUS_ID\n"
        "GPU=${CUDA_VISIBLE_DEVICES:-0}\n"
        "GPU=${GPU%%,*}\n"
        'CC=${CC:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader -i "$GPU")}\n'
        'CC=$(printf %s "$CC" | tr -d .)\n'
        "TRTEXEC=$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)\n"
        + " \\\n  ".join(lines)
        + "\n"
    )
    script.chmod(0o755)
    return script
