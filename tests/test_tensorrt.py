"""The TensorRT path: profiles, trtexec lines and the tensorrt flavour's configs, derived from
the tensor declarations. Engine builds and TensorRT parity run where `import tensorrt` works
(NVIDIA's containers on a GPU) and skip elsewhere; nothing here simulates TensorRT."""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import asdict

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from medpclip import repository
from medpclip import tensorrt_engine as te
from medpclip_core import tensors as T

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
needs_tensorrt = pytest.mark.skipif(
    not HAS_TENSORRT,
    reason="TensorRT is not installable on this machine (no builder wheel, no GPU); engine "
    f"builds and TensorRT parity run in NVIDIA's {te.TRITON_RELEASE} containers on the target GPU",
)


@pytest.mark.parametrize("spec", T.ENCODERS, ids=lambda s: s.name)
def test_profiles_follow_the_declarations(spec, model):
    dims = model.cfg.dims
    prof = te.profile(spec, dims)
    assert list(prof.shapes) == [t.name for t in spec.inputs]
    for t in spec.inputs:
        lo, opt, hi = prof.shapes[t.name]
        assert lo[0] == 1 and hi[0] == spec.max_batch_size  # same max in every input
        assert 1 <= opt[0] <= spec.max_batch_size
        for i, (d, sym) in enumerate(zip(t.dims(dims), t.shape, strict=True), start=1):
            if d >= 0:
                assert lo[i] == opt[i] == hi[i] == d
            else:
                assert (lo[i], opt[i], hi[i]) == T.bounds(sym, dims)
    text = te.profile(T.TEXT_ENCODER, dims).shapes["input_ids"]
    assert text[1][0] == T.OPT_BATCH["text_encoder"]
    # labels from one bucket up to the full context fit the profile
    assert (text[0][1], text[2][1]) == (min(T.TOKEN_BUCKET, dims.L), dims.L)
    # a request with the most points the API allows plus a box fits the profile
    assert T.DYNAMIC_BOUNDS["N"][2] == T.MAX_POINTS + 2


def test_trtexec_script_matches_the_profile(build_dir, model, tmp_path):
    spec = T.IMAGE_ENCODER
    prof = te.profile(spec, model.cfg.dims)
    onnx = build_dir / "onnx" / "image_encoder.onnx"
    fp16 = te.write_trtexec_script(onnx, tmp_path / "fp16", prof, "fp16")
    text = fp16.read_text()
    for i, flag in enumerate(("--minShapes=", "--optShapes=", "--maxShapes=")):
        want = ",".join(f"{n}:{'x'.join(map(str, s[i]))}" for n, s in prof.shapes.items())
        assert f"{flag}{want}" in text
    assert "--fp16" in text and "--precisionConstraints=obey" in text
    assert '"--timingCacheFile=$DIR/../timing.sm${CC}.cache"' in text
    assert '"--saveEngine=$DIR/model.sm${CC}.plan"' in text and "--skipInference" in text
    kept = te.fp32_layers(onnx)
    # INormalizationLayer computes in FP32 unpinned; softmax and the embedding norms are kept
    assert not any("LayerNormalization" in n for n in kept) and any("Softmax" in n for n in kept)
    for flag in ("--layerPrecisions=", "--layerOutputTypes="):
        assert flag + ",".join(f"{n}:fp32" for n in kept) in text
    # the GPU trtexec builds on is CUDA's device 0 of CUDA_VISIBLE_DEVICES, numbered as
    # nvidia-smi numbers, not nvidia-smi's GPU 0 whatever CUDA sees
    assert "export CUDA_DEVICE_ORDER=PCI_BUS_ID" in text and '-i "$GPU"' in text
    assert "GPU=${CUDA_VISIBLE_DEVICES:-0}" in text and "-i 0" not in text
    fp32 = te.write_trtexec_script(onnx, tmp_path / "fp32", prof, "fp32")
    assert "--fp16" not in fp32.read_text() and "--layerPrecisions" not in fp32.read_text()
    assert te.engine_name("8.9") == "model.sm89.plan"


def _register_engines(build_dir, engines, tensorrt=te.TRITON_TENSORRT, ccs=("8.0", "9.0")):
    """Engine metadata as our builder writes it, beside a placeholder plan. The generator reads
    only the metadata (it never loads a plan), which is what these tests check."""
    for spec in T.ENCODERS:
        onnx = build_dir / "onnx" / f"{spec.name}.onnx"
        for cc in ccs:
            d = engines / spec.name
            d.mkdir(parents=True, exist_ok=True)
            plan = d / te.engine_name(cc)
            plan.write_bytes(b"placeholder, never loaded")
            te.EngineMeta(
                model=spec.name,
                tensorrt=tensorrt,
                gpu=f"GPU sm{cc}",
                compute_capability=cc,
                precision="fp16",
                profile={},
                onnx_sha256=te.sha256(onnx),
            ).write(plan.with_suffix(".json"))


def _generate(build_dir, out, engines, flavour):
    return repository.generate(
        out,
        build_dir / "onnx",
        build_dir / "ckpt",
        flavour=flavour,
        engines_dir=engines,
        log=lambda *_: None,
    )


def test_both_flavours_share_everything_but_the_encoders(build_dir, model, tmp_path):
    engines = tmp_path / "engines"
    _register_engines(build_dir, engines)
    cpu = _generate(build_dir, tmp_path / "cpu", engines, "onnxruntime")
    gpu = _generate(build_dir, tmp_path / "gpu", engines, "tensorrt")
    for spec in T.PYTHON_MODELS + T.ENSEMBLES:
        assert (cpu / spec.name / "config.pbtxt").read_text() == (
            gpu / spec.name / "config.pbtxt"
        ).read_text(), spec.name
    dims = model.cfg.dims
    for spec in T.ENCODERS:
        cfg = text_format.Parse((gpu / spec.name / "config.pbtxt").read_text(), mc.ModelConfig())
        ref = text_format.Parse((cpu / spec.name / "config.pbtxt").read_text(), mc.ModelConfig())
        assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == spec.max_batch_size
        assert list(cfg.input) == list(ref.input) and list(cfg.output) == list(ref.output)
        assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
        assert dict(cfg.cc_model_filenames) == {"8.0": "model.sm80.plan", "9.0": "model.sm90.plan"}
        assert sorted(p.name for p in (gpu / spec.name / "1").iterdir()) == [
            "model.sm80.plan",
            "model.sm90.plan",
        ]
        prof = te.profile(spec, dims)
        (warm,) = cfg.model_warmup
        assert {k: list(v.dims) for k, v in warm.inputs.items()} == {
            n: list(s[1][1:]) for n, s in prof.shapes.items()
        }
        assert cfg.optimization.cuda.graphs == (spec.name in repository.CUDA_GRAPH_MODELS)
        assert cfg.dynamic_batching.max_queue_delay_microseconds > 0


def _patch_differs(version: str) -> str:
    """The same major.minor as `version`, another patch: a plan Triton still refuses."""
    major, minor, patch, *build = version.split(".")
    return ".".join([major, minor, str(int(patch) + 1), *build])


@pytest.mark.parametrize(
    "mismatch, message",
    [
        ("onnx", "built from another ONNX"),
        (
            "tensorrt",
            f"built by TensorRT 8.6.1; Triton {te.TRITON_RELEASE} loads plans of TensorRT "
            f"{te.TRITON_TENSORRT} only",
        ),
        (
            "patch",
            f"built by TensorRT {_patch_differs(te.TRITON_TENSORRT)}; Triton "
            f"{te.TRITON_RELEASE} loads plans of TensorRT {te.TRITON_TENSORRT} only",
        ),
        ("missing", "no TensorRT engine for prompt_encoder"),
    ],
)
def test_generator_refuses_mismatched_engines(build_dir, tmp_path, mismatch, message):
    engines = tmp_path / "engines"
    if mismatch == "tensorrt":
        _register_engines(build_dir, engines, tensorrt="8.6.1")
    elif mismatch == "patch":  # major.minor alone let these through before
        _register_engines(build_dir, engines, tensorrt=_patch_differs(te.TRITON_TENSORRT))
    elif mismatch == "onnx":
        _register_engines(build_dir, engines)
        meta = engines / "image_encoder" / "model.sm80.json"
        doc = json.loads(meta.read_text())
        doc["onnx_sha256"] = "0" * 64
        meta.write_text(json.dumps(doc))
        message = "image_encoder engine for GPU sm8.0 (sm 8.0): it was " + message
    with pytest.raises(te.EngineError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _generate(build_dir, tmp_path / "repo", engines, "tensorrt")


def test_tensorrt_export_without_tensorrt_says_where_to_build(build_dir, capsys, tmp_path):
    if HAS_TENSORRT:
        pytest.skip("TensorRT is installed here")
    from medpclip import export

    out = tmp_path / "out"
    shutil.copytree(build_dir / "onnx", out / "onnx")
    with pytest.raises(export.ExportError, match="TensorRT is not installed here"):
        export.export(
            checkpoint=build_dir / "ckpt",
            out=out,
            flavour="tensorrt",
            skip_parity=True,
        )
    for spec in T.ENCODERS:  # the by-hand route is written anyway
        assert (out / "engines" / spec.name / "model.trtexec.sh").is_file()


def test_engine_reuse_needs_every_build_input_to_match(build_dir, model, tmp_path):
    """An engine is reused only if GPU, profile, FP32 layers and workspace match too; older
    metadata (without the newer fields) reads and is then rebuilt, not trusted."""
    spec = T.MASK_DECODER
    onnx = build_dir / "onnx" / f"{spec.name}.onnx"
    prof = {k: [list(s) for s in v] for k, v in te.profile(spec, model.cfg.dims).shapes.items()}
    fp32 = te.fp32_layers(onnx)
    meta = te.EngineMeta(
        model=spec.name,
        tensorrt=te.TRITON_TENSORRT,
        gpu="NVIDIA H100 80GB HBM3",
        compute_capability="9.0",
        precision="fp16",
        profile=prof,
        onnx_sha256=te.sha256(onnx),
        fp32_layers=fp32,
        workspace_bytes=te.WORKSPACE_BYTES,
    )
    path = tmp_path / "model.sm90.json"
    meta.write(path)
    read = te.EngineMeta.read(path)
    assert read == meta

    def why(m, gpu="NVIDIA H100 80GB HBM3", layers=fp32):
        return te.stale_reason(m, onnx, "fp16", te.TRITON_TENSORRT, gpu, prof, layers)

    assert why(read) is None
    assert why(read, gpu="NVIDIA H100 NVL") == "built with another GPU"
    assert why(read, layers=fp32[1:]) == "built with another FP32 layers"
    assert "built by TensorRT" in why(
        te.EngineMeta(**{**asdict(meta), "tensorrt": _patch_differs(te.TRITON_TENSORRT)})
    )
    old = {k: v for k, v in asdict(meta).items() if k not in ("fp32_layers", "workspace_bytes")}
    path.write_text(json.dumps({**old, "unknown_field": 1}))
    assert why(te.EngineMeta.read(path)) == "built with another FP32 layers"


def test_gpu_is_found_through_cuda_not_nvidia_smi():
    """The GPU comes from the CUDA device properties (what Triton reads), so without a CUDA
    device the export says so instead of asking nvidia-smi about GPU 0."""
    import torch

    if torch.cuda.is_available():
        name, cc = te.gpu_identity()
        props = torch.cuda.get_device_properties(0)
        assert (name, cc) == (props.name, f"{props.major}.{props.minor}")
    else:
        with pytest.raises(te.EngineError, match="no CUDA device visible.*CUDA_VISIBLE_DEVICES"):
            te.gpu_identity()


@needs_tensorrt
def test_engines_build_and_match_onnx_runtime(build_dir, model):
    from medpclip_tools import tensorrt_parity

    engines = build_dir / "engines"
    for spec in T.ENCODERS:
        te.build_engine(
            build_dir / "onnx" / f"{spec.name}.onnx",
            engines / spec.name,
            spec,
            model.cfg.dims,
            "fp16",
        )
    assert tensorrt_parity.compare_engines(build_dir, build_dir / "ckpt")
