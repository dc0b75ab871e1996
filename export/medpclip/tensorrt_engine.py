"""TensorRT engines for the exported models: profiles, trtexec lines, build and metadata.

Everything shape-related comes from the tensor declarations (`medpclip_core.tensors`): the
optimisation profile of each input is (min 1, opt, max = the Triton config's max_batch_size) on
the batch axis and the declared bounds on dynamic axes, one profile per engine, so the engine
accepts exactly what Triton's dynamic batcher may send.

Engines are GPU-specific. Each `model.sm<cc>.plan` carries a JSON beside it (TensorRT version,
GPU name, compute capability, precision, profile shapes, sha256 of the ONNX it came from) and a
`.trtexec.sh` with the equivalent command line, so an operator can rebuild it by hand.

The builder uses the TensorRT Python API; it runs where `import tensorrt` works (NVIDIA's
TensorRT/PyTorch containers on the target GPU). Nothing here simulates TensorRT.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx

from medpclip_core import tensors as T

PRECISIONS = ("fp16", "fp32")
# The NGC release every image uses (deploy/docker): Triton 25.06 (2.59) is the first with all
# three gRPC cancellation fixes (server#7840 in 24.12, #8078 for #8034 in 25.04, #8220 in
# 25.06) and still on CUDA 12.9. Its TensorRT is 10.11, as in NGC PyTorch 25.06 where the
# engines are built: a plan must be built by the same major.minor.
TRITON_RELEASE = "25.06"
TRITON_TENSORRT = "10.11"
# ONNX ops kept in FP32 in an FP16 engine: normalisation statistics, softmax and the reductions
# and powers that overflow or lose precision in FP16.
FP32_ONNX_OPS = frozenset(
    {
        "LayerNormalization",
        "Softmax",
        "ReduceMean",
        "ReduceSum",
        "ReduceL2",
        "Pow",
        "Sqrt",
        "Exp",
        "Erf",
    }
)
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
    """Names of the ONNX nodes (= TensorRT layer names) to keep in FP32."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    return [n.name for n in model.graph.node if n.op_type in FP32_ONNX_OPS and n.name]


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
    tensorrt: str
    gpu: str
    compute_capability: str
    precision: str
    profile: dict
    onnx_sha256: str
    built: str = ""

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, path: Path) -> EngineMeta:
        return cls(**json.loads(path.read_text()))


def check_engine(
    meta: EngineMeta, onnx_path: Path, precision: str, tensorrt: str = TRITON_TENSORRT
) -> None:
    """Raise EngineError when the engine does not belong to this ONNX/precision/TensorRT."""
    problems = []
    if meta.onnx_sha256 != sha256(onnx_path):
        problems.append(f"it was built from another ONNX (sha256 {meta.onnx_sha256[:12]})")
    if meta.precision != precision:
        problems.append(f"it is {meta.precision}, {precision} was asked for")
    if ".".join(meta.tensorrt.split(".")[:2]) != tensorrt:
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


def gpu_identity() -> tuple[str, str]:
    """(name, compute capability) of GPU 0, from nvidia-smi."""
    # nvidia-smi counts GPUs in PCI order; make CUDA (and so TensorRT) count the same way
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    try:
        line = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader", "-i", "0"],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        raise EngineError(
            f"no NVIDIA GPU visible (nvidia-smi: {exc}); TensorRT engines are "
            "built on the GPU that will run them"
        ) from None
    name, cc = (s.strip() for s in line.rsplit(",", 1))
    return name, cc


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
    """Build (or reuse) the engine of one model for GPU 0 with the TensorRT Python API."""
    try:
        import tensorrt as trt
    except ImportError:
        raise EngineError(
            "TensorRT is not installed here: build engines in NVIDIA's TensorRT or PyTorch "
            f"container {TRITON_RELEASE} on the target GPU (docker compose up export), or run "
            f"the .trtexec.sh written in {out_dir}"
        ) from None
    if _major_minor(trt) != TRITON_TENSORRT:
        raise EngineError(
            f"TensorRT {trt.__version__} is installed here, but Triton {TRITON_RELEASE} loads "
            f"plans of TensorRT {TRITON_TENSORRT} only: build in the {TRITON_RELEASE} containers"
        )
    gpu, cc = gpu_identity()
    engine = out_dir / engine_name(cc)
    meta_path = engine.with_suffix(".json")
    prof = profile(spec, dims)
    profile_doc = json.loads(json.dumps({k: list(v) for k, v in prof.shapes.items()}))
    timing_cache = timing_cache or out_dir.parent / timing_cache_name(cc)
    write_trtexec_script(onnx_path, out_dir, prof, precision)
    if engine.is_file() and meta_path.is_file():
        meta = EngineMeta.read(meta_path)
        try:
            check_engine(meta, onnx_path, precision)
            if meta.profile == profile_doc:
                log(f"  {spec.name}: engine up to date ({engine.name}, {gpu}), reusing")
                return engine
        except EngineError:
            pass  # stale: rebuild
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
        _keep_fp32(trt, network, set(fp32_layers(onnx_path)))
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
    ).write(meta_path)
    log(f"  {spec.name}: built in {time.perf_counter() - start:.0f} s -> {engine}")
    return engine


def _keep_fp32(trt, network, names: set[str]) -> None:
    """Pin the float layers made from FP32_ONNX_OPS nodes to FP32 (precision and output)."""
    floats = (trt.float32, trt.float16)
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.name not in names and layer.name.split("/")[-1] not in FP32_ONNX_OPS:
            continue
        inputs = [layer.get_input(j) for j in range(layer.num_inputs)]
        if any(t is not None and t.dtype not in floats for t in inputs):
            continue  # e.g. a reduction over the int64 attention mask
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            if layer.get_output(j).dtype in floats:
                layer.set_output_type(j, trt.float32)


def _major_minor(trt) -> str:
    return ".".join(trt.__version__.split(".")[:2])


def write_trtexec_script(onnx_path: Path, out_dir: Path, prof: Profile, precision: str) -> Path:
    """`<out_dir>/model.trtexec.sh`: the same build by hand, for operators. It names the engine
    and the timing cache after the GPU it runs on, like the Python builder (it writes no
    metadata: the repository generator takes only engines our builder made)."""
    cmd = trtexec_command(
        onnx_path.resolve(),
        Path("ENGINE"),
        prof,
        precision,
        Path("CACHE"),
        fp32_layers(onnx_path) if precision == "fp16" else None,
    )
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
        "set -e\n"
        'DIR=$(cd "$(dirname "$0")" && pwd)\n'
        "CC=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader -i 0 | tr -d .)\n"
        "TRTEXEC=$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)\n"
        + " \\\n  ".join(lines)
        + "\n"
    )
    script.chmod(0o755)
    return script
