"""What can be checked of the TensorRT flavour where no TensorRT runs: the trtexec lines against
trtexec 10.11's own option parser, the FP32 layer choice on the real exported graphs (the default
layout and the BiomedCLIP/SAM options) and the one TensorRT version of the build and serve
images. Engine builds and measured parity run where `import tensorrt` works
(tests/test_tensorrt.py); nothing here simulates TensorRT."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from medpclip import export, ngc_images, onnx_export, trtexec_options
from medpclip import tensorrt_engine as te
from medpclip import tensorrt_precision as tp
from medpclip.model import load_checkpoint
from medpclip_core import tensors as T

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "deploy" / "docker"
TINY = ROOT / "export" / "medpclip" / "configs" / "tiny.json"


@pytest.fixture(scope="module")
def variant(tmp_path_factory) -> tuple[Path, object]:
    """The tiny model with every layout option the config gained for BiomedCLIP and SAM
    checkpoints (no ln_pre, LayerNorm eps, MLP text projection, ReLU decoder, half-width
    cross-attention, four mask tokens), exported as users export it."""
    out = tmp_path_factory.mktemp("variant")
    cfg = json.loads(TINY.read_text())
    cfg["name"] = "tiny-variant"
    cfg["vision"].update(pre_norm=False, ln_eps=1e-6)
    cfg["text"].update(proj="mlp", proj_hidden=96)
    cfg["decoder"].update(activation="relu", attention_downsample=2, mask_tokens=4)
    path = out / "variant.json"
    path.write_text(json.dumps(cfg))
    r = export.export(config=str(path), seed=0, out=out, skip_parity=True, log=lambda *_: None)
    return r.onnx_dir, load_checkpoint(r.checkpoint)


@pytest.fixture(scope="module", params=["default", "variant"])
def exported(request, build_dir, model, variant) -> tuple[Path, object]:
    if request.param == "default":
        return build_dir / "onnx", model
    return variant


def _data_inputs(node: onnx.NodeProto) -> list[str]:
    skip = tp.PARAMETER_INPUTS.get(node.op_type, ())
    return [i for k, i in enumerate(node.input) if i and k not in skip]


@pytest.mark.parametrize("spec", T.ENCODERS, ids=lambda s: s.name)
def test_fp32_layers_have_float_inputs_when_run(exported, spec):
    """Every layer pinned to FP32 computes on floats, checked by running the graph (ONNX Runtime
    reports each input's dtype), not by trusting the shape inference the choice was made with;
    the integer nodes left alone are really integer."""
    onnx_dir, m = exported
    path = onnx_dir / f"{spec.name}.onnx"
    graph = onnx.load(str(path))
    selection = tp.select(graph)
    assert selection.pinned, f"{spec.name}: nothing kept in FP32"
    by_name = {tp.layer_name(n): n for n in graph.graph.node}
    nodes = [by_name[n.name] for n in selection.pinned + selection.skipped]
    probes = {i for node in nodes for i in _data_inputs(node)}
    constants = {t.name for t in graph.graph.initializer}
    outputs = {o.name for o in graph.graph.output}
    for name in sorted(probes - constants - outputs):
        graph.graph.output.append(onnx.ValueInfoProto(name=name))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = onnx_export.EXPORTABLES[spec.name].sample_inputs(m.cfg)
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed), strict=True))
    init = {t.name: onnx.numpy_helper.to_array(t).dtype for t in graph.graph.initializer}

    def dtype(i: str) -> np.dtype:
        return got[i].dtype if i in got else init[i]

    for n in selection.pinned:
        kinds = {dtype(i) for i in _data_inputs(by_name[n.name])}
        assert kinds <= {np.dtype(np.float32), np.dtype(np.float16)}, (n, kinds)
        assert n.op in tp.FP32_OPS | tp.FOLLOW_OPS | {"LayerNormalization"}, n
    for n in selection.skipped:
        if n.why.startswith("non-float"):
            kinds = {dtype(i) for i in _data_inputs(by_name[n.name])}
            assert not kinds <= {np.dtype(np.float32), np.dtype(np.float16)}, (n, kinds)


def test_fp32_choice_on_the_exported_graphs(exported):
    """Per op, what the module says: the integer reductions `.any()` exports are found and left
    alone; LayerNormalization computes in FP32 without pinning (stash_type float); LayerNorm2d
    keeps its variance chain, var + eps included, in FP32 and its Sub/Div in FP16."""
    onnx_dir, _ = exported
    prompt = tp.select_file(onnx_dir / "prompt_encoder.onnx")
    integer = [n for n in prompt.skipped if n.why.startswith("non-float")]
    assert integer and all(n.op == "ReduceSum" for n in integer)
    assert not set(n.name for n in integer) & set(prompt.names)
    for name in ("prompt_encoder", "mask_decoder"):  # the two with a LayerNorm2d
        graph = onnx.load(str(onnx_dir / f"{name}.onnx"))
        pinned = set(tp.select(graph).names)
        produced = {o: n for n in graph.graph.node for o in n.output}
        sqrts = [n for n in graph.graph.node if n.op_type == "Sqrt"]
        assert sqrts
        for sqrt in sqrts:
            eps_add = produced[sqrt.input[0]]
            variance = produced[eps_add.input[0]]
            assert (eps_add.op_type, variance.op_type) == ("Add", "ReduceMean")
            assert {sqrt.name, eps_add.name, variance.name} <= pinned
            div = next(n for n in graph.graph.node if sqrt.output[0] in n.input)
            sub = produced[div.input[0]]
            assert (div.op_type, sub.op_type) == ("Div", "Sub")
            assert div.name not in pinned and sub.name not in pinned
    for spec in T.ENCODERS:
        graph = onnx.load(str(onnx_dir / f"{spec.name}.onnx"))
        selection = tp.select(graph)
        for node in graph.graph.node:
            if node.op_type == "LayerNormalization":
                stash = [a.i for a in node.attribute if a.name == "stash_type"]
                assert stash in ([], [onnx.TensorProto.FLOAT]), node.name
                assert node.name not in selection.names
        # a pinned name trtexec cannot take, or a duplicate, would be a silent no-op
        assert len(set(selection.names)) == len(selection.names)
        assert not [n for n in selection.skipped if not n.why.startswith("non-float")]


def _flags(cmd: list[str]) -> dict[str, str]:
    out = {}
    for arg in cmd[1:]:
        flag, _, value = arg.partition("=")
        assert flag not in out, f"{flag} given twice"
        out[flag] = value
    return out


def _pairs(value: str) -> dict[str, str]:
    """trtexec's name:value lists: comma-separated, the name is everything before the last ':'
    (sampleOptions.cpp, splitNameAndValue)."""
    return dict(item.rsplit(":", 1) for item in value.split(","))


@pytest.mark.parametrize("precision", te.PRECISIONS)
@pytest.mark.parametrize("spec", T.ENCODERS, ids=lambda s: s.name)
def test_trtexec_lines_use_only_trtexec_options(exported, spec, precision, tmp_path):
    """Every flag of the written script is one trtexec 10.11 parses, with values its parser
    accepts, and the FP32 layers are exactly the Python builder's."""
    onnx_dir, m = exported
    onnx_path = onnx_dir / f"{spec.name}.onnx"
    prof = te.profile(spec, m.cfg.dims)
    script = te.write_trtexec_script(onnx_path, tmp_path, prof, precision).read_text()
    body = script.split('"$TRTEXEC"', 1)[1]
    written = re.findall(r"(--[A-Za-z0-9]+)", body)
    assert set(written) <= trtexec_options.OPTIONS, set(written) - trtexec_options.OPTIONS
    fp32 = te.fp32_layers(onnx_path) if precision == "fp16" else None
    cmd = te.trtexec_command(onnx_path, tmp_path / "e.plan", prof, precision, tmp_path / "c", fp32)
    flags = _flags(cmd)
    assert set(flags) <= trtexec_options.OPTIONS
    assert set(flags) == set(written)
    pool, size = flags["--memPoolSize"].rsplit(":", 1)
    assert pool in trtexec_options.MEMORY_POOLS and re.fullmatch(r"\d+M", size)
    for key in ("--minShapes", "--optShapes", "--maxShapes"):
        assert set(_pairs(flags[key])) == {t.name for t in spec.inputs}
    if precision == "fp32":
        assert "--fp16" not in flags and "--layerPrecisions" not in flags
        return
    assert flags["--precisionConstraints"] in trtexec_options.PRECISION_CONSTRAINTS
    for key in ("--layerPrecisions", "--layerOutputTypes"):
        pairs = _pairs(flags[key])
        assert list(pairs) == fp32 == tp.select_file(onnx_path).names
        assert set(pairs.values()) == {"fp32"} <= trtexec_options.DATA_TYPES
    assert f"# {len(fp32)} layers kept in FP32" in script


def test_option_list_is_the_images_tensorrt():
    """The option list was taken from the TensorRT the images carry."""
    major_minor = ".".join(te.TRITON_TENSORRT.split(".")[:2])
    assert trtexec_options.TENSORRT_RELEASE == major_minor
    assert len(trtexec_options.OPTIONS) == 114
    assert all(re.fullmatch(r"--[A-Za-z][A-Za-z0-9]*", o) for o in trtexec_options.OPTIONS)


def _from_lines(dockerfile: Path) -> list[str]:
    return re.findall(r"^FROM\s+(\S+)", dockerfile.read_text(), flags=re.M)


def test_build_and_serve_images_carry_one_tensorrt():
    """The export image builds plans with the TensorRT the serving image loads them with, to
    the build number; the Dockerfiles name exactly the images of ngc_images, and no comment in
    deploy/ or compose claims another TensorRT."""
    assert _from_lines(DOCKER / "export.Dockerfile") == [ngc_images.EXPORT_IMAGE]
    assert _from_lines(DOCKER / "triton.Dockerfile") == [ngc_images.TRITON_IMAGE]
    build = ngc_images.TENSORRT_IN_IMAGE[ngc_images.EXPORT_IMAGE]
    serve = ngc_images.TENSORRT_IN_IMAGE[ngc_images.TRITON_IMAGE]
    assert build == serve == te.TRITON_TENSORRT
    assert re.fullmatch(r"\d+\.\d+\.\d+\.\d+", te.TRITON_TENSORRT)
    for image in (ngc_images.EXPORT_IMAGE, ngc_images.TRITON_IMAGE):
        assert image.split(":", 1)[1].startswith(te.TRITON_RELEASE + "-")
    major_minor = ".".join(te.TRITON_TENSORRT.split(".")[:2])
    texts = [p for p in DOCKER.iterdir() if p.is_file()] + [ROOT / "docker-compose.yml"]
    for path in texts:
        for claimed in re.findall(r"TensorRT (\d+\.\d+(?:\.\d+)*)", path.read_text()):
            assert te.TRITON_TENSORRT.startswith(claimed) or claimed == major_minor, (
                path,
                claimed,
            )
