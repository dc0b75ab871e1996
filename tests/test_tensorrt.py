"""The TensorRT path: profiles, trtexec lines and the tensorrt flavour's configs, derived from
the tensor declarations. Engine builds and TensorRT parity run where `import tensorrt` works
(NVIDIA's containers on a GPU) and skip elsewhere; nothing here simulates TensorRT."""

from __future__ import annotations

import importlib.util
import json
import shutil

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
    assert any("LayerNormalization" in n for n in kept) and any("Softmax" in n for n in kept)
    for flag in ("--layerPrecisions=", "--layerOutputTypes="):
        assert flag + ",".join(f"{n}:fp32" for n in kept) in text
    fp32 = te.write_trtexec_script(onnx, tmp_path / "fp32", prof, "fp32")
    assert "--fp16" not in fp32.read_text() and "--layerPrecisions" not in fp32.read_text()
    assert te.engine_name("8.9") == "model.sm89.plan"


def _register_engines(build_dir, engines, tensorrt=f"{te.TRITON_TENSORRT}.0", ccs=("8.0", "9.0")):
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


@pytest.mark.parametrize(
    "mismatch, message",
    [
        ("onnx", "built from another ONNX"),
        (
            "tensorrt",
            f"built by TensorRT 8.6.1; Triton {te.TRITON_RELEASE} loads plans of TensorRT "
            f"{te.TRITON_TENSORRT} only",
        ),
        ("missing", "no TensorRT engine for prompt_encoder"),
    ],
)
def test_generator_refuses_mismatched_engines(build_dir, tmp_path, mismatch, message):
    engines = tmp_path / "engines"
    if mismatch == "tensorrt":
        _register_engines(build_dir, engines, tensorrt="8.6.1")
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
